"""Generate the reference tables in docs/ from the pydantic models (one source of truth).

python -m serve_app.docs          # rewrite the generated sections of docs/*.md
python -m serve_app.docs --check  # exit 1 if a file is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from serve_app.config import (
    AppArgs,
    AuthConfig,
    BatchingConfig,
    C2paConfig,
    ClassifierCheck,
    JobsConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    ProvenanceConfig,
    QualitySteps,
    SafetyConfig,
    SpeedConfig,
    StorageConfig,
    UploadLimits,
    WebhookConfig,
)
from serve_app.protocol import ImageGenerationRequest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _type_name(annotation) -> str:
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "null")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
        if isinstance(value, list):
            return "tiny model" if value else "[]"
        return repr(value)
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default!r}`" if field.default is not None else "—"


def fields_table(model: type[BaseModel], prefix: str = "") -> str:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        type_name = _type_name(field.annotation)
        if "\\|" not in type_name:
            type_name = type_name.replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {type_name} | {_default(field)} | {description} |")
    return "\n".join(rows)


def sections() -> dict[str, dict[str, str]]:
    """File in docs/ -> generated section name -> its text."""
    return {
        "api.md": {"request-parameters": fields_table(ImageGenerationRequest)},
        "configuration.md": {"app-args": _config_tables()},
    }


def _config_tables() -> str:
    return "\n\n".join(
        [
            "`args:` of `serve_app.app:build_app`\n\n" + fields_table(AppArgs),
            "Each entry of `models:`\n\n" + fields_table(ModelConfig),
            "`quality_steps:`\n\n" + fields_table(QualitySteps),
            "`speed:`\n\n" + fields_table(SpeedConfig),
            "`lora:` (per model)\n\n" + fields_table(LoraConfig),
            '`parallel:` (per model; docs/gpu.md "Sequence-parallel replicas")\n\n'
            + fields_table(ParallelConfig),
            '`safety:` (per model; docs/operations.md "Moderation")\n\n'
            + fields_table(SafetyConfig),
            "`safety.text_classifier:` / `safety.image_classifier:`\n\n"
            + fields_table(ClassifierCheck),
            '`provenance:` (per model; docs/operations.md "Provenance")\n\n'
            + fields_table(ProvenanceConfig),
            "`provenance.c2pa:`\n\n" + fields_table(C2paConfig),
            "`batching:` (and a model deployment's `user_config`)\n\n"
            + fields_table(BatchingConfig),
            "`limits:`\n\n" + fields_table(UploadLimits),
            "`storage:`\n\n" + fields_table(StorageConfig),
            "`auth:`\n\n" + fields_table(AuthConfig),
            "`jobs:`\n\n" + fields_table(JobsConfig),
            "`jobs.webhooks:`\n\n" + fields_table(WebhookConfig),
        ]
    )


def render(text: str, generated: dict[str, str], filename: str) -> str:
    for name, body in generated.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        before, found, rest = text.partition(start)
        if not found:
            raise SystemExit(f"{filename} lacks the marker {start}")
        _, found, after = rest.partition(end)
        if not found:
            raise SystemExit(f"{filename} lacks the marker {end}")
        text = f"{before}{start}\n{body}\n{end}{after}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for filename, generated in sections().items():
        path = DOCS / filename
        current = path.read_text()
        wanted = render(current, generated, filename)
        if wanted == current:
            continue
        stale.append(filename)
        if not args.check:
            path.write_text(wanted)
    if args.check and stale:
        print(
            f"docs/{', docs/'.join(stale)} out of date: run python -m serve_app.docs",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
