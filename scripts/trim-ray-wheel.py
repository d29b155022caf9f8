"""Write a copy of a ray wheel without what Ray Serve never imports, so that it fits beside the
code in the 64 MiB a lent GPU machine receives (scripts/gpu-wheels.sh --with-ray).

    python scripts/trim-ray-wheel.py ray-2.60.0-cp312-...whl OUT_DIR

Dropped: the Java bridge (ray/jars, 32 MB of the 79 MB wheel), the libraries Serve does not use
(rllib, tune, train, data, llm), the dashboard's web UI build, and tests; the native binaries
(raylet, gcs_server, _raylet.so) lose their symbol tables (`strip`: symbols, not code). The
RECORD is rewritten to list what remains, so pip installs it as any wheel.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DROP = (
    "ray/jars/",
    "ray/rllib/",
    "ray/tune/",
    "ray/train/",
    "ray/data/",
    "ray/llm/",
    "ray/dashboard/client/build/",
    "ray/tests/",
    "ray/serve/tests/",
)


BINARIES = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")


def stripped(name: str, data: bytes) -> bytes:
    """The binary without symbols, or unchanged where `strip` is not installed."""
    if name not in BINARIES or shutil.which("strip") is None:
        return data
    with tempfile.NamedTemporaryFile() as binary:
        binary.write(data)
        binary.flush()
        subprocess.run(["strip", "--strip-unneeded", binary.name], check=True)
        return Path(binary.name).read_bytes()


def trim(wheel: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as trimmed,
    ):
        kept = [i for i in source.infolist() if not i.filename.startswith(DROP)]
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        entries = {}  # name -> "name,sha256=...,size", for the files kept (as written)
        for info in kept:
            if info is record:
                continue
            data = stripped(info.filename, source.read(info))
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            entries[info.filename] = f"{info.filename},sha256={digest.decode()},{len(data)}"
            trimmed.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        lines = [*entries.values(), f"{record.filename},,"]
        trimmed.writestr(record, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    before, after = wheel.stat().st_size, target.stat().st_size
    print(f"{wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    return target


if __name__ == "__main__":
    trim(Path(sys.argv[1]), Path(sys.argv[2]))
