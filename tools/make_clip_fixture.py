"""Write tests/fixtures/clip_reference.pt: a small random CLIP and OpenAI's outputs on it.

The parity test (tests/test_clip_model.py) compares clip_model.py with these stored outputs, so
it runs without the reference code. Regenerate only with OpenAI's own implementation:

    pip download --no-deps openai-clip && tar xzf openai-clip-1.0.1.tar.gz
    python tools/make_clip_fixture.py --reference openai-clip-1.0.1/clip

Token ids of a list of awkward strings (unicode, html entities, contractions, digits) are stored
too, produced by OpenAI's SimpleTokenizer.
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_model  # noqa: E402

TEXTS = ["a photo of a", "dog", ".", "A Photo Of A  Dog.", "don't stop, we'll've", "&amp;lt;b&gt; &#39;x&#39;",
         "naïve café ÉCOLE", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "2024-11-29 12:30", "漢字 and emoji 😀👍",
         "antidisestablishmentarianism", "supercalifragilisticexpialidocious" * 3, "tab\tnew\nline",
         "<|startoftext|>hi<|endoftext|>", "   ", "", "Herbaceous Vegetation Land", "a photo of a 747-400.",
         "it's O'Neil's", "mojibake: Ã©tÃ©", "x" * 300]
SMALL = dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=64, vision_patch_size=8,
             context_length=77, vocab_size=64, transformer_width=64, transformer_heads=1, transformer_layers=3)


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True, help="folder of OpenAI's clip package (model.py, simple_tokenizer.py)")
    parser.add_argument("--out", default="tests/fixtures/clip_reference.pt")
    args = parser.parse_args()
    ref_model = load_module("ref_model", os.path.join(args.reference, "model.py"))
    ref_tok = load_module("ref_tok", os.path.join(args.reference, "simple_tokenizer.py")).SimpleTokenizer()

    torch.manual_seed(0)
    state_dict = {k: v.half() for k, v in clip_model.CLIP(**SMALL).state_dict().items()}  # fp16 like OpenAI's files
    ref = ref_model.build_model({k: v.clone() for k, v in state_dict.items()}).float().eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.zeros(3, 77, dtype=torch.int)  # the small vocab ends at 63, which plays EOT
    for i, n in enumerate([5, 9, 2]):
        tokens[i, :n] = torch.randint(1, 63, (n,))
        tokens[i, n] = 63
    with torch.no_grad():
        image_features, text_features = ref.encode_image(images), ref.encode_text(tokens)
        logits, _ = ref(images, tokens)
    torch.save(dict(state_dict=state_dict, images=images, tokens=tokens, image_features=image_features,
                    text_features=text_features, logits=logits,
                    texts=TEXTS, token_ids=[ref_tok.encode(t) for t in TEXTS]), args.out)
    print("wrote", args.out, os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
    main()
