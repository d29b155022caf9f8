"""FLUX.1-Kontext-dev's exact architecture, as data: the start of `source: synthetic` (issue 11).

Speed and memory depend on the architecture, not on the weights' values, so the real model's
component configurations are kept here (the same values as the hub's `config.json` files) and
can be built without downloading 33 GB. So far: building every component on the meta device
(no memory) and counting its parameters, which a test checks against the published checkpoint
sizes.

    python -m serve_app.synthetic --param-counts
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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


def build_components(device: str = "meta") -> dict[str, Any]:
    """The four weighted components with FLUX.1-Kontext-dev's shapes, created on `device`
    (`meta`: shapes only, no memory)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        return {
            "transformer": FluxTransformer2DModel(**TRANSFORMER),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_ENCODER)),
            "vae": AutoencoderKL(**VAE),
        }


def param_counts() -> dict[str, int]:
    """Parameters of each component (shared tensors counted once), built on the meta device."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in build_components("meta").items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--param-counts", action="store_true", help="print them as JSON")
    args = parser.parse_args(argv)
    if not args.param_counts:
        parser.print_help()
        return 2
    print(json.dumps(param_counts(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
