"""Write tests/fixtures/hf_clip_b16/ and hf_clip_l14/: small random CLIP folders written by Hugging Face
transformers itself, with transformers' own outputs on a fixed input.

The parity test (tests/test_hf_weights.py) loads each folder with clip_model.load and compares its image
features, text features and logits with the stored ones, so it runs without transformers (which the project
never imports). The folders are shaped like `openai/clip-vit-base-patch16` (ViT-B/16) and
`openai/clip-vit-large-patch14` (ViT-L/14) at reduced size: the real patch sizes 16 and 14 and quick_gelu, but
width 64 (one 64-wide head, OpenAI's layout), two blocks per tower, images of 4 x 4 patches and a vocabulary of
100 ids whose largest, 99, is the EOT (as 49407 is OpenAI's). Every tensor is drawn at random, layer norms
included, so that two tensors swapped by a wrong name map change the outputs. Weights are stored in fp16 (half
the size; both sides compute in fp32 from the same values).

  - hf_clip_b16/: config.json and model.safetensors, exactly as `CLIPModel.save_pretrained` writes them;
  - hf_clip_l14/: config.json and pytorch_model.bin, the layout of transformers < 5 and of the hub's older
    uploads (transformers 5 writes safetensors only, so the .bin is torch.save of the model's state dict, as
    `save_pretrained(safe_serialization=False)` wrote it, with the position_ids buffers older files hold);
  - reference.pt in each: plain tensors (images (fp16, exact), tokens, image_features, text_features, logits_per_image) and the
    transformers version that computed them (written with 5.25.0).

Regenerate (needs network once for the packages):
    python -m venv --system-site-packages /tmp/hfenv && /tmp/hfenv/bin/pip install transformers safetensors
    /tmp/hfenv/bin/python tools/make_hf_fixture.py
"""
import json
import os

import torch
import transformers
from transformers import CLIPConfig, CLIPModel

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
VOCAB, EOT = 100, 99
SHAPES = {  # name -> (patch size, image size, projection_dim, weights file)
    "hf_clip_b16": (16, 64, 32, "model.safetensors"),
    "hf_clip_l14": (14, 56, 48, "pytorch_model.bin"),
}


def config(patch: int, image: int, projection_dim: int) -> CLIPConfig:
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = dict(tower, vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=EOT - 1, eos_token_id=EOT,
                pad_token_id=0)
    vision = dict(tower, image_size=image, patch_size=patch, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def randomise(model: CLIPModel, seed: int) -> None:
    """Every parameter random and fp16-representable: layer-norm weights near 1, the rest at init scale plus noise.
    logit_scale stays near CLIP's initial log(1/0.07) (logits ~14 x cos): at OpenAI's trained 100 x cos, fp32
    rounding alone (cos to ~1e-7, in any order of summation) moves the logits by ~1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(p + 0.02 * noise)
            p.copy_(p.half().float())


def inputs(patch: int, image: int, seed: int):
    """Two random images and three token rows [SOT, ids..., EOT, 0...] of different lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image, image, generator=g).half().float()
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((3, 9, 20)):
        tokens[row, 0], tokens[row, n + 1] = EOT - 1, EOT
        tokens[row, 1:n + 1] = torch.randint(1, EOT - 1, (n,), generator=g)
    return images, tokens


def main():
    for seed, (name, (patch, image, projection_dim, weights)) in enumerate(SHAPES.items()):
        folder = os.path.join(FIXTURES, name)
        os.makedirs(folder, exist_ok=True)
        torch.manual_seed(seed)
        model = CLIPModel(config(patch, image, projection_dim)).eval()
        randomise(model, seed)
        model.half().save_pretrained(folder)   # config.json + model.safetensors
        if weights == "pytorch_model.bin":
            state = model.state_dict()
            state.update({f"{t}_model.embeddings.position_ids": getattr(model, f"{t}_model").embeddings.position_ids
                          for t in ("text", "vision")})
            torch.save(state, os.path.join(folder, weights))
            os.remove(os.path.join(folder, "model.safetensors"))
        reloaded = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()   # as a user would load it
        images, tokens = inputs(patch, image, seed)
        with torch.no_grad():
            out = reloaded(input_ids=tokens, pixel_values=images)
            image_features = reloaded.get_image_features(pixel_values=images).pooler_output
            text_features = reloaded.get_text_features(input_ids=tokens).pooler_output
        torch.save(dict(images=images.half(), tokens=tokens, image_features=image_features, text_features=text_features,
                        logits_per_image=out.logits_per_image, transformers_version=transformers.__version__),
                   os.path.join(folder, "reference.pt"))
        sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
        print(name, json.dumps(sizes))


if __name__ == "__main__":
    main()
