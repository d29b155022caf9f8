"""Build pieces for the `flux2-klein` family: FLUX.2 [klein] 4B served by diffusers'
`Flux2KleinPipeline` (text-to-image, and edits with one or several reference images).

Two models are built here without downloading any weights, as for FLUX.1 Kontext in
`serve_app.tiny` and `serve_app.synthetic`:

* the **tiny** model (`build_tiny_pipeline`, saved by `serve_app.tiny.ensure_tiny_model`):
  random weights and the real geometry -- a `Flux2Transformer2DModel` with `in_channels=128`
  (32 VAE latent channels x 2x2 patches), an `AutoencoderKLFlux2` with 32 latent channels,
  4 blocks (downscale 8, so one token per 16x16 pixels) and a 128-channel batch-norm, a
  `Qwen3ForCausalLM` text encoder with the real 36 layers (the pipeline stacks hidden states 9,
  18 and 27, so the transformer's `joint_attention_dim` is 3x the encoder width) and a
  Qwen2/Qwen3 byte-level BPE tokenizer with Qwen3's special tokens and chat template. Token
  counts and latent shapes match the real model at any size. It produces noise images.
* the **synthetic** model (`build_components`, `build_synthetic_pipeline`, `param_counts`): the
  full-size architecture as data (the values of the hub's `config.json` files of
  black-forest-labs/FLUX.2-klein-4B), built on the target device in the target dtype with seeded,
  bf16-stable random weights, and a tokenizer with the real vocabulary size. FLOPs, memory and
  shapes are the real model's.

    python -m serve_app.synthetic --param-counts flux2-klein-4b
"""

from __future__ import annotations

import math
from typing import Any, cast

# Bump when the architecture or the build recipe changes, so stale caches are not reused.
TINY_VERSION = "1"
TINY_SEED = 0
SEED = 0
# The pipeline pads every prompt to this many tokens (`max_sequence_length`, its default and
# `tokenizer_max_length`), chat template included.
MAX_SEQUENCE_LENGTH = 512
# Hidden states the pipeline stacks (`text_encoder_out_layers`, default): 3 x 2560 = 7680.
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
# klein-4B is step-distilled: 4 steps, no CFG (`is_distilled` in model_index.json).
IS_DISTILLED = True

# ---------------------------------------------------------------------------------------------
# Full-size configurations: black-forest-labs/FLUX.2-klein-4B.
# ---------------------------------------------------------------------------------------------

# diffusers Flux2Transformer2DModel (transformer/config.json). Sources: diffusers'
# scripts/convert_flux2_to_diffusers.py `get_flux2_transformer_config("klein-4b")` (the config the
# hub files were converted with), and the same values quoted as the verbatim hub
# transformer/config.json by third-party loaders (identical for FLUX.2-klein-4B and
# FLUX.2-klein-base-4B): 5 double + 20 single blocks, 24 heads x 128 = 3072 wide.
TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,  # 32 latent channels x 2x2 patch
    "out_channels": None,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,  # 3 stacked Qwen3-4B hidden states x 2560
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],  # (t, h, w, l) position ids
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,  # klein has no guidance embedding (FLUX.2 [dev] has one)
}
# transformers Qwen3ForCausalLM, Qwen/Qwen3-4B (text_encoder/config.json). Sources: the Qwen3-4B
# config.json values (hidden 2560, 36 layers, 32 query / 8 KV heads of 128, MLP 9728, tied
# embeddings, vocabulary 151936), as quoted by FLUX.2-klein-4B ports (OpenFlowLM's
# `TEXT_ENCODER` check, the `text_encoder_overrides` {"hidden_size": 2560, "intermediate_size":
# 9728} of klein loaders) and Z-Image's Qwen3-4B text encoder config. One third-party FLUX.2
# "architecture reference" lists 20 heads / 4 KV heads / 6912: that contradicts the others and
# Qwen's published 4.0B total / 3.6B non-embedding parameters, which these values reproduce.
TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,  # transformers 5 turns it into rope_parameters={"rope_theta": ...}
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# diffusers AutoencoderKLFlux2 (vae/config.json; the FLUX.2 VAE, shared by [dev] and [klein]).
# Sources: convert_flux2_to_diffusers.py builds it as `AutoencoderKLFlux2()` (the class defaults),
# and the hub config.json as quoted by third-party ports. The hub file also has
# `"force_upcast": true`, which is not an argument of this class (omitted here).
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}
# diffusers FlowMatchEulerDiscreteScheduler (scheduler/scheduler_config.json). Source: the
# conversion script copies FLUX.1-dev's scheduler; the hub file as quoted by third-party ports
# (same for every FLUX.2 variant). The pipeline passes its own `sigmas` (linspace(1, 1/steps))
# and `mu` (`compute_empirical_mu`), so `shift`, `base_shift` and `max_shift` are not used.
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
COMPONENTS = {"transformer": TRANSFORMER, "text_encoder": TEXT_ENCODER, "vae": VAE}

# Published sizes the parameter counts are checked against (tests/unit/test_synthetic.py): the
# transformer's flux-2-klein-4b.safetensors is 7.75 GB of bf16 (3.875 B values); Qwen3-4B's model
# card: 4.0 B parameters (4,022,468,096 with tied embeddings); the FLUX.2 VAE: 84,046,115.
PUBLISHED = {"transformer": 3.875e9, "text_encoder": 4_022_468_096, "vae": 84_046_115}

# ---------------------------------------------------------------------------------------------
# Tokenizer: Qwen2/Qwen3 byte-level BPE built locally.
# ---------------------------------------------------------------------------------------------

# Qwen3's regular vocabulary has 151,643 BPE tokens; its 26 special tokens follow, in this order
# (ids 151643..151668), so `len(tokenizer)` is 151,669 (the model's 151,936 rows are padding).
QWEN_REGULAR_TOKENS = 151643
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
# A ChatML template rendering what Qwen3's does for the messages the pipeline sends (an optional
# system message, user/assistant turns, the generation prompt, and the empty think block that
# `enable_thinking=False` adds): "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
# <think>\n\n</think>\n\n". Tools and reasoning-content handling are left out.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
# Whole pieces for the template's words and for common prompt words, so token counts of the
# tiny tokenizer are close to Qwen's (real: "user", "assistant", "\n\n" and common words are one
# token each; the chat template adds 12 tokens around the prompt).
_MERGED_PIECES = ["user", "assistant", "system", "\n\n"] + (
    "a an the of and or in on at to with from by for as is are was be this that it its "
    "photo picture image painting drawing render illustration portrait landscape scene "
    "cat dog bird horse fish person man woman child people face hat car house tree flower "
    "sky sun moon star cloud water sea river mountain forest city street road light shadow "
    "red green blue yellow orange purple pink black white gray brown gold silver "
    "big small large tiny old new young bright dark soft sharp high quality detailed "
    "make put change turn add remove replace keep style color background foreground"
).split()


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token: merge the best-ranked adjacent pair until none applies."""
    pieces = list(word)
    while len(pieces) > 1:
        rank, i = min(
            (ranks.get((left, right), len(ranks)), i)
            for i, (left, right) in enumerate(zip(pieces[:-1], pieces[1:], strict=True))
        )
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte as a token, plus merges that make each of `_MERGED_PIECES` (bare and after a
    space) one token. A merge is added at the lowest priority only while the word, encoded with
    the merges so far, is still in pieces: the words added before keep their encoding."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in byte_chars.values():
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for piece in _MERGED_PIECES:
        for text in (piece, " " + piece) if piece.isalpha() else (piece,):
            word = [byte_chars[b] for b in text.encode("utf-8")]
            while len(pieces := _bpe(word, ranks)) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    return vocab, merges


def build_tokenizer(regular_tokens: int | None = None):
    """A `Qwen2TokenizerFast` (the pipeline's tokenizer class) built in memory: byte-level BPE
    over every byte (any text encodes), Qwen3's 26 special tokens, `<|endoftext|>` as padding,
    `<|im_end|>` as EOS and a Qwen3-equivalent chat template. `regular_tokens`: fill the regular
    vocabulary to this size (151,643 for the real tokenizer's ids), the special tokens after it;
    None: small (tiny model)."""
    # transformers 5 resolves Qwen2TokenizerFast lazily (an alias of Qwen2Tokenizer).
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    vocab, merges = _byte_vocab()
    if regular_tokens is not None:
        # Unreachable filler pieces (no merge produces them): real ids, real vocabulary size.
        while len(vocab) < regular_tokens:
            vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[
            t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")
        ],
        model_max_length=131072,  # Qwen3's; the pipeline truncates at max_sequence_length (512)
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------
# The tiny model.
# ---------------------------------------------------------------------------------------------


def build_tiny_pipeline():
    """Build the tiny `Flux2KleinPipeline` in memory, deterministically (same weights every
    time). Real geometry: 128 transformer input channels, 32 VAE latent channels, downscale 8 and
    2x2 packing (16 pixels per token), 36 text-encoder layers with hidden states 9/18/27 stacked,
    Qwen3 special tokens and chat template; tiny widths."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    text_width = 16
    torch.manual_seed(TINY_SEED)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=32,
            num_hidden_layers=TEXT_ENCODER["num_hidden_layers"],  # 36: layers 9/18/27 are inner
            num_attention_heads=2,
            num_key_value_heads=1,  # grouped-query attention, as Qwen3-4B (32 / 8)
            head_dim=8,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            rope_parameters={"rope_type": "default", "rope_theta": TEXT_ENCODER["rope_theta"]},
            rms_norm_eps=TEXT_ENCODER["rms_norm_eps"],
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(TINY_SEED + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=TRANSFORMER["in_channels"],  # 128 = 32 latent channels x 2x2 packing
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(TEXT_ENCODER_OUT_LAYERS) * text_width,
        timestep_guidance_channels=TRANSFORMER["timestep_guidance_channels"],
        mlp_ratio=TRANSFORMER["mlp_ratio"],
        axes_dims_rope=(4, 4, 4, 4),  # 4 position axes (t, h, w, l), summing to the head dim
        rope_theta=TRANSFORMER["rope_theta"],
        guidance_embeds=False,
    )
    torch.manual_seed(TINY_SEED + 2)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),  # 4 blocks -> downscale 8, as the real VAE
        layers_per_block=1,
        latent_channels=VAE["latent_channels"],  # 32 -> 128-channel batch-norm after 2x2 patches
        norm_num_groups=4,
        sample_size=1024,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=VAE["batch_norm_eps"],
        patch_size=(2, 2),
    )
    # Non-trivial latent statistics, so code that forgets to (de)normalise latents shows.
    generator = torch.Generator().manual_seed(TINY_SEED + 3)
    bn = cast(Any, vae).bn  # BatchNorm2d(128): the pipeline (de)normalises latents with its stats
    with torch.no_grad():
        bn.running_mean.copy_(0.2 * torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
    # As from_pretrained leaves them (diffusers' mixins hide nn.Module.eval from mypy).
    modules: list[Any] = [text_encoder, transformer, vae]
    for module in modules:
        module.eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=IS_DISTILLED,
    )


# ---------------------------------------------------------------------------------------------
# The synthetic (full-size) model.
# ---------------------------------------------------------------------------------------------

# Linear layers whose output is added to a residual stream, beyond the FLUX.1 ones
# `serve_app.random_weights.randomize` already scales (`attn.to_out.0`, `attn.to_add_out`): scaled
# down by the stream's depth as well.
_RESIDUAL_OUTPUTS = (
    "ff.linear_out", "ff_context.linear_out",  # FLUX.2 double blocks
    "single_transformer_blocks.*.attn.to_out",  # FLUX.2 single blocks (fused attn + MLP out)
    "self_attn.o_proj", "mlp.down_proj",  # Qwen3
)  # fmt: skip


def _randomize(module, depth: int, generator) -> None:
    """`serve_app.random_weights.randomize` (N(0, 1/fan_in) weights, N(0, 1) embeddings, zero
    biases, FLUX.1's residual outputs / sqrt(2 depth)), then FLUX.2's and Qwen3's residual outputs
    scaled down by 1/sqrt(2 depth) too. A tied input embedding is re-drawn last (the tied `lm_head`
    Linear would otherwise leave it at 1/sqrt(hidden))."""
    import torch
    from torch import nn

    from serve_app.random_weights import FLUX_RESIDUAL_OUTPUTS, matches, randomize

    randomize(module, depth, generator)
    with torch.no_grad():
        for name, layer in module.named_modules():
            if (
                isinstance(layer, nn.Linear)
                and matches(name, _RESIDUAL_OUTPUTS)
                and not matches(name, FLUX_RESIDUAL_OUTPUTS)
            ):
                layer.weight.mul_(1 / math.sqrt(2 * depth))
        get_input_embeddings = getattr(module, "get_input_embeddings", None)
        embeddings = get_input_embeddings() if get_input_embeddings else None
        if isinstance(embeddings, nn.Embedding):
            embeddings.weight.normal_(0, 1, generator=generator)


def build_components(
    device: str = "meta", dtype=None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The three weighted components with FLUX.2-klein-4B's shapes, created on `device` in `dtype`
    (`meta`: shapes only, no memory). `overrides` changes config values per component (tests
    shrink the widths to run the real depths on a CPU)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    configs = {
        name: {**config, **(overrides or {}).get(name, {})} for name, config in COMPONENTS.items()
    }
    default_dtype = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # parameters are born in it: no float32 copy
    try:
        with torch.device(device):
            text_config = Qwen3Config(**configs["text_encoder"])
            if dtype is not None:
                text_config.dtype = dtype
            return {
                "transformer": Flux2Transformer2DModel(**configs["transformer"]),
                "text_encoder": Qwen3ForCausalLM(text_config),
                "vae": AutoencoderKLFlux2(**configs["vae"]),
            }
    finally:
        torch.set_default_dtype(default_dtype)


def build_synthetic_pipeline(
    device: str, dtype, overrides: dict[str, dict[str, Any]] | None = None
):
    """A `Flux2KleinPipeline` with FLUX.2-klein-4B's architecture and seeded random weights,
    built on `device` in `dtype` (nothing is materialised on the CPU first), and a tokenizer with
    Qwen3's real ids (151,643 regular + 26 special tokens)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    components = build_components(device, dtype, overrides)
    generator = torch.Generator(device=device).manual_seed(SEED)
    for module in components.values():
        module.eval().requires_grad_(False)
    transformer, text_encoder = components["transformer"], components["text_encoder"]
    _randomize(
        transformer, transformer.config.num_layers + transformer.config.num_single_layers, generator
    )
    _randomize(text_encoder, text_encoder.config.num_hidden_layers, generator)
    _randomize(components["vae"], 1, generator)  # no residual stream to protect: GroupNorms
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        tokenizer=build_tokenizer(QWEN_REGULAR_TOKENS),
        is_distilled=IS_DISTILLED,
        **components,
    )


def param_counts() -> dict[str, int]:
    """Parameters of each component (shared tensors counted once), built on the meta device."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in build_components("meta").items()
    }
