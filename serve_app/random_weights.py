"""Random weights that keep activations in range, for the synthetic full-size models of every
family (`serve_app.synthetic`, `families/*_build.py`): the shared draw and the dotted-name
patterns that pick a model's residual-branch outputs. Torch only, imported when drawing."""

from __future__ import annotations

import math

# FLUX.1's (and its text encoders') linear layers whose output is added to a residual stream:
# scaled down by the stream's depth. Other families add their own on top.
FLUX_RESIDUAL_OUTPUTS = (
    "attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2",  # FLUX double blocks
    "single_transformer_blocks.*.proj_out",  # FLUX single blocks
    "SelfAttention.o", "DenseReluDense.wo",  # T5
    "self_attn.out_proj", "mlp.fc2",  # CLIP
)  # fmt: skip


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module's dotted name contains one of the dotted `patterns` (`*`: any part)."""
    parts = name.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        for start in range(len(parts) - len(wanted) + 1):
            window = parts[start : start + len(wanted)]
            if all(w in ("*", p) for w, p in zip(wanted, window, strict=True)):
                return True
    return False


def randomize(module, depth: int, generator) -> None:
    """Re-draw every weight in place: linear and conv weights from N(0, 1/fan_in) (outputs keep
    their inputs' scale), residual-branch outputs further by 1/sqrt(2 * depth) (the stream
    grows by O(1) over all blocks), embeddings from N(0, 1), biases zero; norms stay 1/0."""
    import torch
    from torch import nn

    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                std = 1 / math.sqrt(layer.weight[0].numel())
                if matches(name, FLUX_RESIDUAL_OUTPUTS):
                    std /= math.sqrt(2 * depth)
                layer.weight.normal_(0, std, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, nn.Embedding):
                layer.weight.normal_(0, 1, generator=generator)
