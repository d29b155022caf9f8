"""Keep each KubeRay manifest's serveConfigV2 identical to its serve config:

    cluster/rayservice.yaml           <- configs/flux-kontext.yaml (a GPU per replica)
    cluster/rayservice-parallel.yaml  <- configs/flux-kontext-parallel.yaml (8-GPU nodes,
                                         2 GPUs per replica)

    python -m serve_app.cluster          # rewrite every serveConfigV2 from its serve config
    python -m serve_app.cluster --check  # exit 1 if any differs (a test runs this)

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
# Every manifest and the serve config it embeds.
MANIFESTS = {
    RAYSERVICE: SERVE_CONFIG,
    ROOT / "cluster" / "rayservice-parallel.yaml": ROOT / "configs" / "flux-kontext-parallel.yaml",
}
KEY = "serveConfigV2: |"


def render(rayservice: str, serve_config: str, name: str = "the manifest") -> str:
    """Replace the block under `serveConfigV2: |` with the serve config's text."""
    lines = rayservice.splitlines()
    index = next((i for i, line in enumerate(lines) if line.strip() == KEY), None)
    if index is None:
        raise SystemExit(f"{name} has no '{KEY}' line")
    line = lines[index]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    end = index + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent)):
        end += 1
    block = [(indent + text).rstrip() for text in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[: index + 1] + block + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if a manifest is stale")
    args = parser.parse_args(argv)
    stale = []
    for manifest, serve_config in MANIFESTS.items():
        name = manifest.relative_to(ROOT).as_posix()
        current = manifest.read_text()
        wanted = render(current, serve_config.read_text(), name)
        if wanted == current:
            continue
        stale.append(name)
        if not args.check:
            manifest.write_text(wanted)
    if args.check and stale:
        print(f"{', '.join(stale)} stale: run python -m serve_app.cluster", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
