"""Tiny moderation classifiers built here and saved with `save_pretrained`, so tests load them
through the same transformers `pipeline` path as a real hub classifier.

- The image classifier is a ConvNeXt with weights set by hand: it flags an image (`nsfw`, score
  ~0.9997) when most of its 4x4 patches are strongly red (R high, G and B low), and scores ~0.0003
  otherwise, so a red input deterministically fails and the tiny model's noise passes.
- The text classifier is a BERT with seeded random weights over a small word vocabulary (every
  word of the test prompts is a token of its own); its threshold is placed between the scores of
  two chosen prompts (`text_threshold`), and the test asserts they are far apart.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

FLAGGED_RED = (250, 10, 10)
CLEAN_PROMPT = "a calm lake at dawn"
FLAGGED_PROMPT = "a violent storm"
TEXT_WORDS = ["a", "calm", "lake", "at", "dawn", "violent", "storm", "red", "cat", "house"]


def red_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, FLAGGED_RED)


def save_image_classifier(directory: Path) -> Path:
    import torch
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessor,
    )

    config = ConvNextConfig(
        num_channels=3,
        patch_size=4,
        num_stages=1,
        hidden_sizes=[2],
        depths=[0],
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ConvNextForImageClassification(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        conv = model.convnext.embeddings.patch_embeddings
        # Channel 0: mean over the patch of R - G - B (pixels normalised to [-1, 1]) minus 1:
        # positive only for strongly red patches; channel 1 is its negative.
        conv.weight[0, 0], conv.weight[0, 1:] = 1 / 16, -1 / 16
        conv.bias[0] = -1.0
        conv.weight[1], conv.bias[1] = -conv.weight[0], 1.0
        # The two layer norms turn [a, -a] into [sign(a), -sign(a)].
        model.convnext.embeddings.layernorm.weight.fill_(1.0)
        model.convnext.layernorm.weight.fill_(1.0)
        model.classifier.weight[0, 0], model.classifier.weight[1, 0] = -4.0, 4.0
    model.save_pretrained(directory)
    ConvNextImageProcessor(
        size={"shortest_edge": 32},
        crop_pct=1.0,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(directory)
    return directory


def save_text_classifier(directory: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEXT_WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"))
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        initializer_range=0.5,  # wide enough that a few words move the scores
        num_labels=2,
        # Label 0 is the one these seeded weights score the flagged prompt higher on.
        id2label={0: "unsafe", 1: "safe"},
        label2id={"unsafe": 0, "safe": 1},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def text_threshold(directory: Path) -> tuple[str, float]:
    """The label the flagged prompt scores higher on, and a threshold halfway between the two
    prompts' scores for it (loaded through the app's own loader)."""
    from serve_app.classifiers import load_classifier
    from serve_app.config import ClassifierCheck

    probe = ClassifierCheck(source=str(directory), flagged_labels=["unsafe"], threshold=0.5)
    flagged, clean = load_classifier(probe, "text-classification", "cpu")(
        [FLAGGED_PROMPT, CLEAN_PROMPT]
    )
    label = max(("safe", "unsafe"), key=lambda name: flagged[name] - clean[name])
    margin = flagged[label] - clean[label]
    assert label == "unsafe" and margin > 0.1, f"the prompts' scores are too close ({margin})"
    return label, (flagged[label] + clean[label]) / 2
