"""`python -m serve_app.bench <command>`: benchmark tools."""

from __future__ import annotations

import argparse
import sys

from serve_app.bench import gpu, load, moderation, modes, parallel, plan, provenance, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("gpu", gpu), ("load", load), ("report", report), ("modes", modes),
                         ("plan", plan), ("parallel", parallel),
                         ("provenance", provenance), ("moderation", moderation)):  # fmt: skip
        command = commands.add_parser(name, help=(module.__doc__ or name).splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
