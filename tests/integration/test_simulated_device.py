"""The lent GPU machine, simulated: `scripts/gpu-check.sh` in a bare venv holding only what that
machine has (torch, transformers, accelerate, peft, safetensors, sentencepiece, pillow,
huggingface_hub: the device tool's KINDS.md) plus the wheels `scripts/gpu-wheels.sh` downloads,
run with no network, must finish and report every step: measured, or with an expected reason.

CPU torch stands in for the device's CUDA torch (so the fp8 rows say they need CUDA or torchao),
and Python 3.11 for its 3.12 (`PY_VERSION=3.11` wheels). The venv is cached under
`~/.cache/serve-app-simulated-device/` (`$SERVE_APP_SIMULATED_DEVICE_CACHE`), keyed by the pinned
versions, and the wheels by gpu-wheels.sh and the versions it pins; downloading them needs PyPI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# torch as the CI machines install it (scripts/setup.sh: a CPU build on local disk); never unpinned.
TORCH = "torch==2.13.0"
# The GPU machine's packages the app needs, at this project's versions (.venv) for reproducibility.
DEVICE_PACKAGES = (
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "sentencepiece",
    "pillow",
    "huggingface_hub",
    # Also on the GPU machine (KINDS.md's full list) and needed by diffusers, which the packages
    # above do not pull in at these versions.
    "requests",
    "regex",
)
NOT_ON_DEVICE = ("diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
WHEEL_PINS = ("diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
CACHE = Path(
    os.environ.get("SERVE_APP_SIMULATED_DEVICE_CACHE")
    or Path.home() / ".cache" / "serve-app-simulated-device"
)
ARGS = ["--source", "tiny", "--size", "128x128", "--small-size", "64x64", "--steps", "2"]
ARGS += ["--batches", "1,2", "--small-batches", "1,2"]  # every step, in under 4 minutes here
# The bench's own budget ends a slow run (skipping rows with the reason) before the test's timeout.
ARGS += ["--budget-s", "360"]
STEP_ROWS = (
    "plain",
    "compile",
    "fp8-compile",
    "batches",
    "lora",
    "cache",
    *(
        f"attention:{b}"
        for b in (
            "_native_cudnn",
            "_native_flash",
            "_native_efficient",
            "flash",
            "_flash_3",
            "sage",
        )
    ),
    "fp8-compile-cache",
)
MEASURED = ("plain", "compile", "batches", "lora", "cache")  # must run on a CPU
FP8_REASON = re.compile(r"CUDA|torchao", re.IGNORECASE)
# What diffusers says when a backend cannot run here: a missing package or no kernel for a CPU.
ATTENTION_REASON = re.compile(
    r"flash-attn|sageattention|FA3|not usable|No viable backend|CUDA|not supported", re.IGNORECASE
)


def _versions(names) -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in names]


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path):
    """One builder at a time per cache (xdist workers, concurrent CI jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# Where pip finds packages (the CPU torch may come from a local index given this way): kept.
PIP_SOURCES = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT",
               "PIP_DEFAULT_TIMEOUT", "PIP_TRUSTED_HOST")  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without pip's, venvs' or Python's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "SERVE_APP_", "HF_", "RAY_"))
        or k in PIP_SOURCES
    }
    return {**env, **extra}


def _device_venv() -> Path:
    """A venv with CPU torch and the device's packages only, built once per pinned set."""
    pins = [TORCH, *_versions(DEVICE_PACKAGES)]
    venv = CACHE / f"venv-py{sys.version_info[0]}{sys.version_info[1]}-{_key(pins)}"
    with _locked(CACHE / ".venv.lock"):
        if (venv / "ok").exists():
            return venv
        building = venv.with_name(venv.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)
        # Not a copy of .venv: venv's base interpreter, no site-packages of this one.
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", *pins],
            check=True, env=_clean_env(), timeout=1200,
        )  # fmt: skip
        # What the GPU machine lacks, though a package here pulled it in (typer needs pydantic
        # at .venv's versions): the wheels must bring it, as there.
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes",
             *NOT_ON_DEVICE],
            check=True, env=_clean_env(), capture_output=True,
        )  # fmt: skip
        building.rename(venv)  # `python -m pip` and bin/python work from the new path
        (venv / "ok").write_text("\n".join(pins) + "\n")
    return venv


def _wheels() -> Path:
    """`PY_VERSION=3.11 bash scripts/gpu-wheels.sh` (needs PyPI), once per script and pins."""
    script = (ROOT / "scripts" / "gpu-wheels.sh").read_bytes()
    wheels = CACHE / f"wheels-{_key(script, _versions(WHEEL_PINS))}"
    with _locked(CACHE / ".wheels.lock"):
        if (wheels / "ok").exists():
            return wheels
        building = wheels.with_name(wheels.name + ".building")
        shutil.rmtree(wheels, ignore_errors=True)
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "gpu-wheels.sh")],
            env={**_clean_env(), "PY_VERSION": "3.11", "WHEELS": str(building)},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        building.rename(wheels)
        (wheels / "ok").write_text(done.stdout)
    return wheels


def _offline() -> list[str]:
    """`unshare -n` (a network namespace with nothing in it) where this runs as root."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n"]
    return []


def test_gpu_check_on_a_simulated_device(tiny_cache_dir, tmp_path):
    started = time.monotonic()
    venv = _device_venv()
    wheels = _wheels()
    prepared_s = time.monotonic() - started
    python = venv / "bin" / "python"
    # The device has none of these: the wheels must bring them (diffusers, pydantic) or the
    # app must not need them (ray, torchao outside the fp8 rows).
    bare = subprocess.run(
        [str(python), "-c", "import importlib.util as u; "
         "print([n for n in ('diffusers', 'pydantic', 'ray', 'torchao', 'serve_app') "
         "if u.find_spec(n)])"],
        capture_output=True, text=True, check=True, env=_clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert bare.stdout.strip() == "[]", bare.stdout

    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    (cache_root / "tiny-flux-kontext-v1").symlink_to(tiny_cache_dir)
    env = _clean_env(
        PYTHON=str(python),
        WHEELS=str(wheels),
        RESULTS=str(tmp_path / "results"),
        SERVE_APP_CACHE=str(cache_root),
        # Without a network namespace: no index, no config (find-links to this machine's disk).
        PIP_NO_INDEX="1",
        PIP_CONFIG_FILE="/dev/null",
    )
    offline = _offline()
    done = subprocess.run(
        [*offline, "bash", str(ROOT / "scripts" / "gpu-check.sh"), *ARGS],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    run_s = time.monotonic() - started - prepared_s
    print(f"simulated device: venv and wheels {prepared_s:.0f} s, gpu-check {run_s:.0f} s, "
          f"offline by {'unshare -n' if offline else 'PIP_NO_INDEX'}")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "gpu-check: torch " in done.stdout

    result = json.loads((tmp_path / "results" / "gpu.json").read_text())
    rows = {row["step"]: row for row in result["rows"]}
    assert list(rows) == list(STEP_ROWS), list(rows)
    for name in MEASURED:
        row = rows[name]
        assert "error" not in row and "skipped" not in row, (name, row)
    for name in ("plain", "compile", "cache"):
        assert rows[name]["text_to_image"]["s_per_image"] > 0
        assert rows[name]["edit"]["s_per_image"] > 0
    assert rows["compile"]["compile_s"] >= 0
    assert rows["lora"]["text_to_image"]["s_per_image"] > 0
    assert all("s_per_image" in m for s in rows["batches"]["series"].values() for m in s)
    for name in ("fp8-compile", "fp8-compile-cache"):
        reason = rows[name].get("skipped") or rows[name].get("error") or ""
        assert FP8_REASON.search(reason), (name, rows[name])
    for name in STEP_ROWS:
        if name.startswith("attention:") and "text_to_image" not in rows[name]:
            reason = rows[name].get("error") or rows[name].get("skipped") or ""
            assert ATTENTION_REASON.search(reason), (name, rows[name])
    # Every estimate a step ran under came from this run's measurements or a stated prior.
    assert all("estimate_s" in row for row in result["rows"] if "wall_s" in row)
    assert (tmp_path / "results" / "gpu.md").read_text().strip() in done.stdout
