"""Random LoRA adapters for a FLUX transformer, in the two file formats diffusers reads: the
diffusers/PEFT layout and kohya's (`lora_unet_...`, `lora_down`/`lora_up`, `alpha`).

For tests and benchmarks: the tiny model has random weights, so its adapters are random too; a
seed makes them reproducible, and their size follows the transformer they were made for.

    python -m serve_app.lora_synthetic --out ~/.cache/serve_app/lora --name demo
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, cast

import torch
from safetensors.torch import save_file

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")


def adapter_state_dict(
    transformer: torch.nn.Module,
    *,
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.5,
    fmt: Literal["peft", "kohya"] = "peft",
    poison: float | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA weights for the attention projections (`peft`) or the double blocks' image-attention
    output and the single blocks' output (`kohya`); `strength` scales the update. `poison`
    (NaN, inf) replaces one weight of every up matrix: a damaged file, which must be refused."""
    generator = torch.Generator().manual_seed(seed)

    def pair(in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, rank, generator=generator) * strength
        if poison is not None:
            up[0, 0] = poison
        return down.contiguous(), up.contiguous()

    state: dict[str, torch.Tensor] = {}
    modules = {  # the original layers, also where PEFT already wrapped them
        name: getattr(module, "base_layer", module)
        for name, module in transformer.named_modules()
        if ".lora_" not in name and not name.endswith(".base_layer")
    }
    if fmt == "peft":
        for name, module in modules.items():
            attention = ".attn." in name and name.endswith(ATTENTION)
            if isinstance(module, torch.nn.Linear) and attention:
                down, up = pair(module.in_features, module.out_features)
                state[f"transformer.{name}.lora_A.weight"] = down
                state[f"transformer.{name}.lora_B.weight"] = up
        return state
    targets = {
        f"double_blocks_{i}_img_attn_proj": modules[f"transformer_blocks.{i}.attn.to_out.0"]
        for i in range(len(cast(torch.nn.ModuleList, transformer.transformer_blocks)))
    } | {
        f"single_blocks_{i}_linear2": modules[f"single_transformer_blocks.{i}.proj_out"]
        for i in range(len(cast(torch.nn.ModuleList, transformer.single_transformer_blocks)))
    }
    for name, module in targets.items():
        down, up = pair(module.in_features, module.out_features)
        state[f"lora_unet_{name}.lora_down.weight"] = down
        state[f"lora_unet_{name}.lora_up.weight"] = up
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    return state


def write_adapter(
    transformer: torch.nn.Module, path: str | Path, **options
) -> dict[str, torch.Tensor]:
    """Write `adapter_state_dict(...)` to `path` (a `.safetensors` file); returns it."""
    state = adapter_state_dict(transformer, **options)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def main(argv: list[str] | None = None) -> None:
    from diffusers import FluxTransformer2DModel

    from serve_app.tiny import ensure_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for <name>.safetensors")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--model-dir", help="diffusers model directory; default: the tiny model")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["peft", "kohya"], default="peft")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or str(ensure_tiny_model())
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    path = Path(args.out).expanduser() / f"{args.name}.safetensors"
    write_adapter(transformer, path, rank=args.rank, seed=args.seed, fmt=args.format)
    print(path)


if __name__ == "__main__":
    main()
