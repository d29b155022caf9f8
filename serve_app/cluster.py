"""Keep cluster/rayservice.yaml's serveConfigV2 identical to configs/flux-kontext.yaml.

    python -m serve_app.cluster          # rewrite serveConfigV2 from the serve config
    python -m serve_app.cluster --check  # exit 1 if they differ (a test runs this)

The serve config file is the one source of truth; the RayService embeds its text verbatim
(comments included) as a YAML block string.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "configs" / "flux-kontext.yaml"
RAYSERVICE = ROOT / "cluster" / "rayservice.yaml"
KEY = "serveConfigV2: |"


def render(rayservice: str, serve_config: str) -> str:
    """Replace the block under `serveConfigV2: |` with the serve config's text."""
    lines = rayservice.splitlines()
    index = next((i for i, line in enumerate(lines) if line.strip() == KEY), None)
    if index is None:
        raise SystemExit(f"{RAYSERVICE} has no '{KEY}' line")
    line = lines[index]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    end = index + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent)):
        end += 1
    block = [(indent + text).rstrip() for text in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[: index + 1] + block + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the manifest is stale")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if args.check:
        if wanted != current:
            print(
                "cluster/rayservice.yaml is stale: run python -m serve_app.cluster", file=sys.stderr
            )
            return 1
        return 0
    RAYSERVICE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
