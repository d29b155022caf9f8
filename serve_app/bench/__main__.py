"""`python -m serve_app.bench <command>`: benchmark tools."""

from __future__ import annotations

import argparse
import sys

from serve_app.bench import gpu, load, modes, plan, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gpu_parser = commands.add_parser("gpu", help=gpu.__doc__.splitlines()[0])
    gpu.add_arguments(gpu_parser)
    gpu_parser.set_defaults(run=gpu.run)
    load_parser = commands.add_parser("load", help=load.__doc__.splitlines()[0])
    load.add_arguments(load_parser)
    load_parser.set_defaults(run=load.run)
    report_parser = commands.add_parser("report", help=report.__doc__.splitlines()[0])
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.run)
    modes_parser = commands.add_parser("modes", help=modes.__doc__.splitlines()[0])
    modes.add_arguments(modes_parser)
    modes_parser.set_defaults(run=modes.run)
    plan_parser = commands.add_parser("plan", help=plan.__doc__.splitlines()[0])
    plan.add_arguments(plan_parser)
    plan_parser.set_defaults(run=plan.run)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
