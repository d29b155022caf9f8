"""LoRA adapter files for the engine: read one, and refuse it before anything is injected when it
does not fit the model (layer shapes) or holds NaN/infinite weights. No HTTP, no Ray.

Thread-safe: `read_adapter_file` runs on a worker thread beside a pipeline call, so it checks
against the layer shapes taken at load (`linear_shapes`), never against live modules that the
pipeline thread may be wrapping or unwrapping for other adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


class AdapterLoadError(ValueError):
    """An adapter file is unreadable or does not fit this model; the message says which."""


class AdapterFamilyError(AdapterLoadError):
    """The adapter adapts layers this model does not have: it was trained for another model
    family (the client chose the wrong adapter, not a damaged file)."""


def linear_shapes(pipe: Any) -> dict[str, tuple[int, int]]:
    """`"<component>.<module>"` -> (out_features, in_features) of every Linear layer of the
    pipeline's transformer and text encoder (take it before any adapter wraps one)."""
    return {
        f"{component}.{module_name}": (module.out_features, module.in_features)
        for component in ("transformer", "text_encoder")
        for module_name, module in getattr(pipe, component).named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def read_adapter_file(
    name: str,
    path: str,
    shapes: Mapping[str, tuple[int, int]],
    model_id: str,
    lora_state_dict: Callable[[str], tuple[dict, dict | None]],
) -> dict[str, torch.Tensor]:
    """An adapter file as a state dict in diffusers' layout (the family's `lora_state_dict`),
    checked against the model's layers `shapes` (so a mismatch is refused before anything is
    injected)."""
    try:
        state, alphas = lora_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        reason = str(exc).replace(path, f"{name}.safetensors")  # no server paths to clients
        raise AdapterLoadError(
            f"adapter {name!r} could not be read as a LoRA of this model's family "
            f"(.safetensors in the diffusers/PEFT or kohya format): {reason[:300]}"
        ) from None
    if not state:
        raise AdapterLoadError(f"adapter {name!r} holds no LoRA weights")
    check_adapter_finite(name, {**state, **(alphas or {})})
    check_adapter_shapes(name, state, shapes, model_id)
    return {**state, **(alphas or {})}  # alphas keep their keys; load_lora_weights reads them


def check_adapter_finite(name: str, state: Mapping[str, torch.Tensor | float]) -> None:
    """Refuse NaN or infinite weights: PEFT would inject them and every image of the adapter
    would come out black (one pass over the weights, cheap next to the read)."""
    for key, value in state.items():
        tensor = torch.as_tensor(value)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterLoadError(
                f"adapter {name!r} holds {bad} NaN or infinite weight(s) in {key}: the "
                "file is damaged or was trained with a diverging loss; replace it"
            )


def check_adapter_shapes(
    name: str,
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    model_id: str,
) -> None:
    """Each LoRA matrix against the (out, in) features of the layer it adapts. An adapter that
    adapts any layer the model does not have is another family's (`AdapterFamilyError`: the
    families here share some layer names and widths, never all of their layers)."""
    matrices = []
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        for marker, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if prefix not in ("transformer", "text_encoder") or marker not in rest:
                continue
            if tensor.ndim == 2:
                matrices.append((key, f"{prefix}.{rest.split(marker)[0]}", dim, tensor))
    missing = sorted({layer for _, layer, _, _ in matrices if layer not in shapes})
    if missing:
        raise AdapterFamilyError(
            f"adapter {name!r} does not fit model {model_id!r}: it adapts {len(missing)} "
            f"layer(s) the model does not have, e.g. {missing[0]}"
        )
    for key, layer, dim, tensor in matrices:
        expected = shapes[layer][dim]
        if tensor.shape[dim] != expected:
            raise AdapterLoadError(
                f"adapter {name!r} does not fit model {model_id!r}: {key} has "
                f"shape {tuple(tensor.shape)}, the model's layer has {expected} features"
            )
