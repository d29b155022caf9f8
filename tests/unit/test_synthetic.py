"""The synthetic model's architecture is FLUX.1-Kontext-dev's: parameter counts equal the
published checkpoints' (bf16 safetensors sizes / 2), built on the meta device in seconds."""

import json

from serve_app.synthetic import main, param_counts

# transformer: 23,802,816,640 bytes of bf16 (diffusion_pytorch_model.safetensors.index.json);
# text_encoder_2: 9,524,621,312 bytes (T5-v1.1-XXL encoder); CLIP ViT-L/14 text tower; FLUX VAE.
PUBLISHED = {
    "transformer": 23_802_816_640 // 2,
    "text_encoder": 123_060_480,
    "text_encoder_2": 9_524_621_312 // 2,
    "vae": 83_819_683,
}


def test_parameter_counts_match_the_real_model(capsys):
    assert param_counts() == PUBLISHED
    assert main(["--param-counts"]) == 0
    assert json.loads(capsys.readouterr().out) == PUBLISHED
