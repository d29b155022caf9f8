"""The embedded tiny FLUX.1 model (Kontext, and [dev] under another pipeline class), and the
cache that every family's tiny model is saved in.

A randomly initialised ``FluxKontextPipeline`` with the real geometry (VAE downscale 8, 16 latent
channels, transformer ``in_channels=64``) so token counts and shapes match FLUX.1-Kontext-dev at any
size. It is built offline, deterministically, saved with ``save_pretrained`` and then loaded through
the same ``from_pretrained`` path as real weights. It produces noise images; everything around the
model (batching, codecs, the API) is real.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_SEED = 0
T5_MAX_LENGTH = 512

_COMMON_WORDS = (
    "a an the of and or in on at to with from by for as is are was be this that it its "
    "photo picture image painting drawing render illustration portrait landscape scene "
    "cat dog bird horse fish person man woman child people face hat car house tree flower "
    "sky sun moon star cloud water sea river mountain forest city street road light shadow "
    "red green blue yellow orange purple pink black white gray brown gold silver "
    "big small large tiny old new young bright dark soft sharp high quality detailed "
    "make put change turn add remove replace keep style color background foreground"
).split()


def default_cache_dir(family: str = "flux-kontext") -> Path:
    """Where a family's tiny model is saved: under ``$SERVE_APP_CACHE`` (or
    ``~/.cache/serve_app``)."""
    from serve_app.cache import tiny_model_dir

    return tiny_model_dir(_runner(family).tiny_version, family)


def _runner(family: str):
    from serve_app.config import ModelConfig
    from serve_app.families import family_runner

    return family_runner(ModelConfig.model_validate({"family": family, "source": "tiny"}))


def _t5_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: specials, single characters and some common words."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -5.0) for c in chars]
    vocab += [("▁" + c, -5.5) for c in chars]
    vocab += [("▁" + w, -3.0) for w in _COMMON_WORDS]
    return vocab


def _clip_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary without merges: every byte, alone and word-final."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def build_tiny_pipeline():
    """Build the tiny pipeline in memory, deterministically (same weights every time)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )

    # transformers 5 resolves T5TokenizerFast lazily (an alias of T5Tokenizer): mypy cannot see it.
    from transformers import (  # type: ignore[attr-defined]
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    clip_vocab = _clip_vocab()
    clip_tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_tokenizer = T5TokenizerFast(vocab=_t5_vocab(), model_max_length=T5_MAX_LENGTH)

    torch.manual_seed(TINY_SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    )
    torch.manual_seed(TINY_SEED + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    torch.manual_seed(TINY_SEED + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing, as in FLUX.1
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=True,  # FLUX.1 [dev] models are guidance-distilled
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(TINY_SEED + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),  # 4 blocks -> downscale 8, as in FLUX.1
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def ensure_tiny_model(cache_dir: str | Path | None = None, family: str = "flux-kontext") -> Path:
    """Return a directory holding the saved tiny model of `family`, building it on first use
    (each family's runner says how: `FamilyRunner.build_tiny`).

    Several replicas may start at once: each builds into its own temporary directory and the first
    rename wins, so a reader never sees a half-written model.
    """
    target = Path(cache_dir) if cache_dir else default_cache_dir(family)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the embedded tiny %s model into %s", family, target)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _runner(family).build_tiny().save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
