"""`source: synthetic`: FLUX.1-Kontext-dev's exact architecture with random weights.

Speed and memory depend on the architecture, not on the weights' values, so the real model's
component configurations are kept here as data (the values of the hub's `config.json` files) and
built without downloading 33 GB: every weight is created directly on the target device in the
target dtype, then re-drawn from a seeded, variance-preserving normal distribution whose residual
branches are scaled down by depth, so activations stay finite in bf16 through any number of
steps. Tokenizers with the real vocabulary sizes are built in memory. Images are noise; FLOPs,
memory and shapes are the real model's.

    python -m serve_app.synthetic --param-counts [NAME]  # every component, on the meta device
    python -m serve_app.synthetic --flops 1024x1024  # transformer FLOPs per denoising step
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Callable
from typing import Any, cast

from serve_app.geometry import PATCH, parse_wxh
from serve_app.random_weights import randomize

SEED = 0
T5_PIECES = 32000  # sentencepiece pieces of T5-v1.1; the tokenizer adds 100 extra ids
CLIP_BOS, CLIP_EOS = 49406, 49407  # CLIP's special tokens are its last two ids

# diffusers FluxTransformer2DModel (transformer/config.json)
TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# transformers T5EncoderModel, T5-v1.1-XXL (text_encoder_2/config.json)
T5_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
# transformers CLIPTextModel, CLIP ViT-L/14 text tower (text_encoder/config.json)
CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    # As in the checkpoint: eos_token_id 2 makes CLIP pool at the highest id (its EOS).
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# diffusers AutoencoderKL, the 16-channel FLUX VAE (vae/config.json)
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# diffusers FlowMatchEulerDiscreteScheduler (scheduler/scheduler_config.json)
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


COMPONENTS = {
    "transformer": TRANSFORMER,
    "text_encoder": CLIP_TEXT,
    "text_encoder_2": T5_ENCODER,
    "vae": VAE,
}


def build_components(
    device: str = "meta", dtype=None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The four weighted components with FLUX.1-Kontext-dev's shapes, created on `device` in
    `dtype` (`meta`: shapes only, no memory). `overrides` changes config values per component
    (tests shrink the widths to run the real depths on a CPU)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = {
        name: {**config, **(overrides or {}).get(name, {})} for name, config in COMPONENTS.items()
    }
    default_dtype = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # parameters are born in it: no float32 copy
    try:
        with torch.device(device):
            return {
                "transformer": FluxTransformer2DModel(**configs["transformer"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
                "text_encoder_2": T5EncoderModel(T5Config(**configs["text_encoder_2"])),
                "vae": AutoencoderKL(**configs["vae"]),
            }
    finally:
        torch.set_default_dtype(default_dtype)


def build_tokenizers():
    """CLIP (49,408 ids, BOS/EOS last) and T5 (32,000 pieces + 100 extra ids) tokenizers built in
    memory: byte/character pieces so any text encodes, filled to the real vocabulary sizes."""
    # transformers 5 resolves T5TokenizerFast lazily (an alias of T5Tokenizer): mypy cannot see it.
    from transformers import CLIPTokenizer, T5TokenizerFast  # type: ignore[attr-defined]
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    clip_vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        clip_vocab.setdefault(char, len(clip_vocab))
        clip_vocab.setdefault(char + "</w>", len(clip_vocab))
    while len(clip_vocab) < CLIP_BOS:
        clip_vocab[f"w{len(clip_vocab)}</w>"] = len(clip_vocab)
    clip_vocab["<|startoftext|>"], clip_vocab["<|endoftext|>"] = CLIP_BOS, CLIP_EOS
    clip = CLIPTokenizer(
        vocab=clip_vocab,
        merges=[],
        model_max_length=CLIP_TEXT["max_position_embeddings"],
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    pieces += [(f"▁w{i}", -20.0) for i in range(len(pieces), T5_PIECES)]
    t5 = T5TokenizerFast(vocab=pieces, model_max_length=512)
    return clip, t5


def build_pipeline(
    device: str,
    dtype,
    overrides: dict[str, dict[str, Any]] | None = None,
    pipeline_cls: Any = None,
):
    """A `FluxKontextPipeline` (or `pipeline_cls`: FLUX.1 [dev]'s `FluxPipeline`) with the real
    architecture and seeded random weights, built on `device` in `dtype` (seconds on a GPU:
    nothing is materialised on the CPU first)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipeline_cls = pipeline_cls or FluxKontextPipeline

    components = build_components(device, dtype, overrides)
    generator = torch.Generator(device=device).manual_seed(SEED)
    for module in components.values():
        module.eval().requires_grad_(False)
    transformer, t5 = components["transformer"], components["text_encoder_2"]
    randomize(
        transformer, transformer.config.num_layers + transformer.config.num_single_layers, generator
    )
    randomize(
        components["text_encoder"], components["text_encoder"].config.num_hidden_layers, generator
    )
    randomize(t5, t5.config.num_layers, generator)
    randomize(components["vae"], 1, generator)  # no residual stream to protect: GroupNorms
    clip_tokenizer, t5_tokenizer = build_tokenizers()
    return pipeline_cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        tokenizer=clip_tokenizer,
        tokenizer_2=t5_tokenizer,
        **components,
    )


def flops_per_step(
    width: int,
    height: int,
    conditioning_images: int = 0,
    text_tokens: int = 512,
    transformer_config: dict[str, Any] | None = None,
) -> int:
    """FLOPs of one transformer forward (one denoising step; FLUX.1 [dev] is guidance-distilled,
    so one forward per step) for one image, counted by torch's FLOP counter on the meta device.
    An edit's conditioning image adds its tokens to the sequence. Default: the real model's
    transformer; `transformer_config` counts another (the tiny one, in the CPU benchmark)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = transformer_config or TRANSFORMER
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    image_tokens = (width // PATCH) * (height // PATCH)
    tokens = image_tokens * (1 + conditioning_images)
    with torch.device("meta"):
        inputs = {
            "hidden_states": torch.empty(1, tokens, config["in_channels"]),
            "encoder_hidden_states": torch.empty(1, text_tokens, config["joint_attention_dim"]),
            "pooled_projections": torch.empty(1, config["pooled_projection_dim"]),
            "timestep": torch.empty(1),
            "guidance": torch.empty(1),
            "img_ids": torch.empty(tokens, 3),
            "txt_ids": torch.empty(text_tokens, 3),
        }
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            # diffusers' mixins hide nn.Module.__call__ from mypy; this is the module's call.
            cast(Callable[..., Any], transformer)(**inputs, return_dict=False)
    return counter.get_total_flops()


# Published checkpoints of this architecture: what each changes from FLUX.1-Kontext-dev's configs.
# FLUX.1 [dev] is the same network; [schnell] is timestep-distilled without guidance embedding.
FLUX_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "flux1-kontext-dev": {},
    "flux1-dev": {},
    "flux1-schnell": {"transformer": {"guidance_embeds": False}},
}


# Every checkpoint whose synthetic variant is built here or by its family's build module.
CHECKPOINTS = (*FLUX_VARIANTS, "flux2-klein-4b", "qwen-image", "qwen-image-edit")


def param_counts(name: str = "flux1-kontext-dev") -> dict[str, int]:
    """Parameters of each component of checkpoint `name` (shared tensors counted once), built
    on the meta device."""
    if name == "flux2-klein-4b":
        from serve_app.families import flux2_klein_build

        return flux2_klein_build.param_counts()
    if name in ("qwen-image", "qwen-image-edit"):
        from serve_app.families import qwen_image_build

        return qwen_image_build.param_counts(name)
    if name not in FLUX_VARIANTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return {
        component: sum(p.numel() for p in module.parameters())
        for component, module in build_components("meta", overrides=FLUX_VARIANTS[name]).items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--param-counts",
        nargs="?",
        const="flux1-kontext-dev",
        metavar="NAME",
        help=f"print them as JSON for NAME (default flux1-kontext-dev): {', '.join(CHECKPOINTS)}",
    )
    parser.add_argument("--flops", metavar="WxH", help="transformer FLOPs per step at a size")
    args = parser.parse_args(argv)
    if args.param_counts:
        if args.param_counts not in CHECKPOINTS:
            parser.error(f"unknown NAME {args.param_counts!r}; known: {', '.join(CHECKPOINTS)}")
        print(json.dumps(param_counts(args.param_counts), indent=2))
    elif args.flops:
        width, height = parse_wxh(args.flops)
        print(json.dumps({
            "text_to_image": flops_per_step(width, height),
            "edit": flops_per_step(width, height, conditioning_images=1),
        }, indent=2))  # fmt: skip
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
