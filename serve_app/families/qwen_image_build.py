"""Build pieces for the Qwen-Image family: Qwen-Image (text to image), Qwen-Image-Edit (one image
per prompt) and Qwen-Image-Edit-2509 (`QwenImageEditPlusPipeline`, several images per prompt).

Two kinds of model, as for FLUX.1 Kontext (`serve_app.tiny`, `serve_app.synthetic`):

* the embedded tiny model: randomly initialised, with the real geometry (Wan-style
  `AutoencoderKLQwenImage`, 16 latent channels, 8x spatial downscale; `QwenImageTransformer2DModel`
  with `in_channels=64`, i.e. 2x2 packing; a tiny `Qwen2_5_VLForConditionalGeneration` with a
  working vision tower of the real patch geometry, so an edit image costs the real number of
  vision tokens). Its byte-level BPE tokenizer is built locally and has merges for every word of
  the pipelines' prompt templates, so the template prefixes the pipelines drop
  (`prompt_template_encode_start_idx`: 34 for text to image, 64 for edits) are exactly those
  prefixes, as with the real tokenizer. Built deterministically, saved with `save_pretrained`
  and loaded back through `from_pretrained` like real weights. Images are noise.
* `source: synthetic`: the published architecture as data (the hub `config.json` values) built
  on any device in any dtype, with seeded bf16-stable random weights
  (`serve_app.random_weights.randomize` plus the Qwen residual-output names and the VAE's 3-D
  convolutions) and tokenizers with the real vocabulary (151,643 byte-level BPE ids + 22
  specials at their real ids).

    python -m serve_app.synthetic --param-counts qwen-image
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

# Bump when the architecture or the build recipe changes, so stale caches are not reused.
TINY_VERSION = "1"
TINY_SEED = 0
SEED = 0  # synthetic weights

# ---------------------------------------------------------------------------------------------
# Published configurations (the hub's config.json files). Qwen/Qwen-Image and Qwen/Qwen-Image-Edit
# (and -Edit-2509) ship identical transformer, text_encoder, vae and scheduler configurations; the
# edit repos add `processor/` (a Qwen2VLProcessor). Sources (read on public copies of the files):
#  - transformer: Qwen/Qwen-Image-Edit transformer/config.json as quoted in a diffusers
#    source-reading note, and kohya-ss musubi-tuner qwen_image_model.py (Qwen-Image's, diffusers
#    0.34.0.dev0); both equal diffusers' QwenImageTransformer2DModel.__init__ defaults.
#  - text_encoder: Qwen2.5-VL-7B-Instruct config.json as embedded by modelscope DiffSynth-Studio
#    (diffsynth/models/qwen_image_text_encoder.py) and musubi-tuner; same as the Qwen2.5-VL-7B hub
#    repo's (vision tower 32 blocks x 1280, LM 28 layers x 3584, vocab rows 152064).
#  - vae: Qwen-Image vae/config.json (diffusers 0.34.0.dev0) embedded by ComfyUI/colab loaders and
#    other repos; equal to AutoencoderKLQwenImage.__init__ defaults.
#  - scheduler: Qwen-Image scheduler/scheduler_config.json as quoted in a Qwen-Image pipeline
#    write-up (max_shift 0.9, max_image_seq_len 8192, shift_terminal 0.02, exponential shift).
#  - processor: Qwen2.5-VL preprocessor_config.json (min_pixels 3136, max_pixels 12845056,
#    patch 14, merge 2, CLIP mean/std).
# ---------------------------------------------------------------------------------------------

# diffusers QwenImageTransformer2DModel (transformer/config.json)
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

# transformers Qwen2_5_VLForConditionalGeneration, Qwen2.5-VL-7B-Instruct (text_encoder/config.json)
QWEN_VOCAB = 151643  # byte-level BPE ids; <|endoftext|> is id 151643, the first special
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)  # fmt: skip  (ids 151643..151664, in this order, as in Qwen2.5's tokenizer.json)
TEXT_ENCODER_TEXT: dict[str, Any] = {
    "vocab_size": 152064,  # embedding rows (padded past the 151665 tokenizer ids)
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}
TEXT_ENCODER_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
TEXT_ENCODER: dict[str, Any] = {
    "text_config": TEXT_ENCODER_TEXT,
    "vision_config": TEXT_ENCODER_VISION,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "tie_word_embeddings": False,
}

# diffusers AutoencoderKLQwenImage (vae/config.json): Wan-2.1-style causal 3-D VAE, 16 channels.
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
]  # fmt: skip
VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],  # 3 spatial downsamples: 8x
    "dropout": 0.0,
    "latents_mean": LATENTS_MEAN,
    "latents_std": LATENTS_STD,
}

# diffusers FlowMatchEulerDiscreteScheduler (scheduler/scheduler_config.json)
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

# transformers Qwen2VLImageProcessor (processor/preprocessor_config.json of the edit repos)
IMAGE_PROCESSOR: dict[str, Any] = {
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

COMPONENTS = {"transformer": TRANSFORMER, "text_encoder": TEXT_ENCODER, "vae": VAE}
VARIANTS = ("qwen-image", "qwen-image-edit")  # same weighted architecture; edit adds a processor

# Published parameter counts, for comparison (tests/unit/test_synthetic.py):
# Qwen-Image technical report (arXiv 2508.02324, Table 1): MMDiT 20B; VLM 7B (ViT 32 layers,
# LLM 28 layers); VAE encoder 54M + decoder 73M = 127M. Hub safetensors metadata of
# Qwen/Qwen2.5-VL-7B-Instruct: 8.29B.
PUBLISHED = {"transformer": 20e9, "text_encoder": 8.29e9, "vae": 127e6}

# The prompt templates' words: the tiny tokenizer merges each into one token, as Qwen2.5's does.
_TEMPLATE_PIECES = (
    "system Describe user color assistant"
    " Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity Ġtext Ġspatial"
    " Ġrelationships Ġof Ġobjects Ġand Ġbackground Ġkey Ġfeatures Ġinput Ġthen Ġexplain Ġhow"
    " Ġuser Ġinstruction Ġshould Ġalter Ġor Ġmodify ĠGenerate Ġa Ġnew Ġthat Ġmeets"
    " Ġrequirements Ġwhile Ġmaintaining Ġconsistency Ġwith Ġoriginal Ġwhere Ġappropriate"
    " ĠPicture Ġ( ), 's"
).split()
_COMMON_WORDS = (
    "an in on at to from for as is are was be this it its photo picture painting drawing render"
    " illustration portrait landscape scene cat dog bird horse fish person man woman child people"
    " face hat car house tree flower sky sun moon star cloud water sea river mountain forest city"
    " street road light shadow red green blue yellow orange purple pink black white gray brown"
    " gold silver big small large tiny old young bright dark soft sharp high quality detailed make"
    " put change turn add remove replace keep style sign says hello world"
).split()


def _merges_for(piece: str) -> list[tuple[str, str]]:
    """Left-to-right merges that join `piece` (byte-level unicode form) into one token."""
    return [(piece[:i], piece[i]) for i in range(1, len(piece))]


def build_tokenizer(vocab_size: int | None = None):
    """A Qwen2 byte-level BPE tokenizer: the 256 byte pieces, merges that make every prompt-template
    word one token (and some common words), then, with `vocab_size`, unreachable filler ids up to
    it; the 22 Qwen2.5 special tokens follow (at ids 151643.. when `vocab_size=QWEN_VOCAB`)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    pieces = list(_TEMPLATE_PIECES) + [f"Ġ{w}" for w in _COMMON_WORDS]
    # Every Ġ-word merge ranks before every bare-word one, so a bare word's inner merges (c+o of
    # "color") never pre-empt a Ġ-word's chain ("Ġ"+"c", "Ġc"+"o", ... of "Ġconsistency").
    pieces.sort(key=lambda piece: not piece.startswith("Ġ"))
    for piece in pieces:
        for left, right in _merges_for(piece):
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} built pieces")
        while len(vocab) < vocab_size:
            vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)  # never produced by the merges
    for token in QWEN_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # (left, right) pairs are accepted too
        unk_token=None,  # type: ignore[arg-type]
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS], special_tokens=True
    )
    return tokenizer


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def build_processor(tokenizer, image_processor=None):
    """`Qwen2VLProcessor` of the edit pipelines: the Qwen2-VL image processor (PIL backend, the
    published settings unless `image_processor` is given) and `tokenizer`; no video processor (the
    pipelines never pass videos).

    transformers 5.24 cannot build or load a `Qwen2VLProcessor` without torchvision: its
    class check of the (absent) video processor raises `AttributeError: type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'`, and `save_pretrained` trips over
    `video_processor=None`. Without torchvision the processor is therefore assembled directly
    (what `__init__` sets) and saved as its parts (`processor/`: the image processor's and the
    tokenizer's files, the layout of the hub repos); `load_processor` reads them back."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    if image_processor is None:
        image_processor = Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR)
    if _torchvision_available():
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.image_processor, processor.tokenizer = image_processor, tokenizer
    processor.video_processor, processor.chat_template = None, None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)

    def save_pretrained(save_directory, **kwargs):  # diffusers calls it for the component
        processor.image_processor.save_pretrained(save_directory)
        processor.tokenizer.save_pretrained(save_directory)
        return [str(save_directory)]

    processor.save_pretrained = save_pretrained  # type: ignore[method-assign,assignment]
    return processor


def load_processor(model_dir: str | Path):
    """The `Qwen2VLProcessor` of a saved edit model (tiny or a hub snapshot), loadable with or
    without torchvision: pass it as `from_pretrained(model_dir, processor=load_processor(...))`."""
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    folder = Path(model_dir) / "processor"
    if _torchvision_available():
        return Qwen2VLProcessor.from_pretrained(folder)
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()
    tokenizer = Qwen2Tokenizer.from_pretrained(
        folder if has_tokenizer else folder.parent / "tokenizer"
    )
    return build_processor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(folder))


def _token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "vision_token_id": ids("<|vision_pad|>"),
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
    }


def _pipeline_class(edit: bool, plus: bool):
    import diffusers

    if plus:
        return diffusers.QwenImageEditPlusPipeline
    return diffusers.QwenImageEditPipeline if edit else diffusers.QwenImagePipeline


def build_tiny_pipeline(edit: bool = False, plus: bool = False):
    """Build a tiny pipeline in memory, deterministically (same weights every time):
    `QwenImagePipeline`, `QwenImageEditPipeline` (`edit=True`) or `QwenImageEditPlusPipeline`
    (`plus=True`). The three share the same component recipe; the edit ones add a processor."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    edit = edit or plus
    tokenizer = build_tokenizer()
    token_ids: dict[str, Any] = dict(_token_ids(tokenizer))
    hidden = 32
    torch.manual_seed(TINY_SEED)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": hidden,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6,
                # head_dim 16: the M-RoPE sections (t, h, w) cover its 8 rotary pairs
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "rope_theta": 1e6,
                },
                "tie_word_embeddings": False,
                **{k: token_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            },  # fmt: skip
            vision_config={  # the real patch geometry: 14 px patches, 2x2 merge, 112 px windows
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_heads": 2,
                "out_hidden_size": hidden,
                "in_channels": 3,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [1],
            },
            tie_word_embeddings=False,
            **token_ids,
        )
    )
    torch.manual_seed(TINY_SEED + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing, as in Qwen-Image
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,  # the text encoder's hidden size
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # frame, height, width: sums to the head dim
    )
    torch.manual_seed(TINY_SEED + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],  # 3 downsamples -> 8x, as in Qwen-Image
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    for module in (text_encoder, transformer, vae):
        cast(Any, module).eval()
    components: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    if edit:
        components["processor"] = build_processor(tokenizer)
    return _pipeline_class(edit, plus)(**components)


# ---------------------------------------------------------------------------------------------
# synthetic: the full-size architecture with random weights
# ---------------------------------------------------------------------------------------------

# Linear layers whose output is added to a residual stream, scaled down by the stream's depth.
_RESIDUAL_OUTPUTS = (
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2",  # MMDiT blocks
    "self_attn.o_proj", "layers.*.mlp.down_proj",  # Qwen2.5 LM decoder layers
    "blocks.*.attn.proj", "blocks.*.mlp.down_proj",  # Qwen2.5-VL vision blocks
)  # fmt: skip


def randomize(module, depth: int, generator) -> None:
    """`serve_app.random_weights.randomize` (linear/conv2d from N(0, 1/fan_in), embeddings N(0, 1),
    biases 0), then the pieces it does not know: Qwen's residual-branch outputs re-drawn with the
    extra 1/sqrt(2 * depth), and 3-D convolutions (the VAE's causal convs, the ViT patch embed)
    drawn like the 2-D ones."""
    import torch
    from torch import nn

    from serve_app import random_weights

    random_weights.randomize(module, depth, generator)
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear) and random_weights.matches(name, _RESIDUAL_OUTPUTS):
                std = 1 / math.sqrt(layer.weight[0].numel()) / math.sqrt(2 * depth)
                layer.weight.normal_(0, std, generator=generator)
            elif isinstance(layer, nn.Conv3d):
                layer.weight.normal_(0, 1 / math.sqrt(layer.weight[0].numel()), generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()


def _configs(overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for name, config in COMPONENTS.items():
        change = dict((overrides or {}).get(name, {}))
        if name == "text_encoder":  # nested: {"text_config": {...}, "vision_config": {...}}
            config = {
                **config,
                "text_config": {**config["text_config"], **change.pop("text_config", {})},
                "vision_config": {**config["vision_config"], **change.pop("vision_config", {})},
            }
        configs[name] = {**config, **change}
    return configs


def build_components(
    device: str = "meta", dtype=None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The three weighted components with Qwen-Image's shapes (Qwen-Image-Edit's are the same),
    created on `device` in `dtype` (`meta`: shapes only, no memory). `overrides` changes config
    values per component; for `text_encoder` give `{"text_config": {...}, "vision_config": {...}}`
    (tests shrink the widths to run the real depths on a CPU)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    configs = _configs(overrides)
    default_dtype = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # parameters are born in it: no float32 copy
    try:
        with torch.device(device):
            return {
                "transformer": QwenImageTransformer2DModel(**configs["transformer"]),
                "text_encoder": Qwen2_5_VLForConditionalGeneration(
                    Qwen2_5_VLConfig(**configs["text_encoder"])
                ),
                "vae": AutoencoderKLQwenImage(**configs["vae"]),
            }
    finally:
        torch.set_default_dtype(default_dtype)


def build_tokenizers():
    """The real-size tokenizer (151,643 BPE ids, then the 22 specials at 151643..151664) and the
    edit pipelines' processor around it."""
    tokenizer = build_tokenizer(vocab_size=QWEN_VOCAB)
    return tokenizer, build_processor(tokenizer)


def build_synthetic_pipeline(
    device: str, dtype, overrides: dict[str, dict[str, Any]] | None = None, edit: bool = False,
    plus: bool = False,
):  # fmt: skip
    """A `QwenImagePipeline` (or `QwenImageEditPipeline` with `edit`, `QwenImageEditPlusPipeline`
    with `plus`) with the real architecture and seeded random weights, built on `device` in
    `dtype` (nothing is materialised on the CPU first)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = build_components(device, dtype, overrides)
    generator = torch.Generator(device=device).manual_seed(SEED)
    for module in components.values():
        module.eval().requires_grad_(False)
    transformer, text_encoder = components["transformer"], components["text_encoder"]
    randomize(transformer, transformer.config.num_layers, generator)
    text_config = text_encoder.config.text_config
    randomize(text_encoder.model.language_model, text_config.num_hidden_layers, generator)
    randomize(text_encoder.model.visual, text_encoder.config.vision_config.depth, generator)
    randomize(text_encoder.lm_head, 1, generator)
    randomize(components["vae"], 1, generator)  # RMS-normed convs: no residual stream to protect
    tokenizer, processor = build_tokenizers()
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids > {text_config.vocab_size} rows")
    extra = {"processor": processor} if edit or plus else {}
    return _pipeline_class(edit or plus, plus)(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        tokenizer=tokenizer,
        **components,
        **extra,
    )


def param_counts(name: str = "qwen-image") -> dict[str, int]:
    """Parameters of each component of `name` (`qwen-image` or `qwen-image-edit`; shared tensors
    counted once), built on the meta device. The text encoder is the whole Qwen2.5-VL-7B (vision
    tower and LM head included) as both repos ship it; `text_encoder.visual` and
    `text_encoder.lm_head` break it down."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: expected one of {VARIANTS}")
    components = build_components("meta")
    counts = {
        component: sum(p.numel() for p in module.parameters())
        for component, module in components.items()
    }
    text_encoder = components["text_encoder"]
    counts["text_encoder.visual"] = sum(p.numel() for p in text_encoder.model.visual.parameters())
    counts["text_encoder.lm_head"] = text_encoder.lm_head.weight.numel()
    vae = components["vae"]
    counts["vae.encoder"] = sum(p.numel() for p in vae.encoder.parameters()) + sum(
        p.numel() for p in vae.quant_conv.parameters()
    )
    counts["vae.decoder"] = sum(p.numel() for p in vae.decoder.parameters()) + sum(
        p.numel() for p in vae.post_quant_conv.parameters()
    )
    return counts
