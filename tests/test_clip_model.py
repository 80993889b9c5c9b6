"""CLIP parity, tokenizer ids, loader errors and the prompt hooks of clip_model.py."""
import os

import pytest
import torch

import clip_model
from clip_model import CLIP, CLIPLoadError, architecture, build_model, random_clip, tokenize

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_reference.pt")


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def tiny():
    return random_clip("tiny", seed=0)


# -- parity with OpenAI's implementation (outputs stored by tools/make_clip_fixture.py) ---------

def test_features_match_openai_reference(reference):
    model = build_model(reference["state_dict"])
    with torch.no_grad():
        img = model.encode_image(reference["images"])
        txt = model.encode_text(reference["tokens"])
        logits, logits_t = model(reference["images"], reference["tokens"])
    torch.testing.assert_close(img, reference["image_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, reference["text_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits_t, logits.t())


def test_token_ids_match_openai_reference(reference):
    for text, ids in zip(reference["texts"], reference["token_ids"]):
        assert clip_model.tokenizer().encode(text) == ids, text


def test_tokenize_known_ids():
    tokens = tokenize(["a photo of a", "dog", "."])
    assert tokens.dtype == torch.int32 and tokens.shape == (3, 77)
    assert tokens[0, :6].tolist() == [49406, 320, 1125, 539, 320, 49407]
    assert tokens[1, :3].tolist() == [49406, 1929, 49407]
    assert tokens[2, :3].tolist() == [49406, 269, 49407]
    assert tokens[1, 3:].abs().sum() == 0  # zero padding
    assert tokenize("X X X X")[0, 1:5].tolist() == [343] * 4
    assert clip_model.tokenizer().decode(tokenize("a photo of a dog.")[0, 1:7]) == "a photo of a dog . "


def test_tokenize_truncation():
    with pytest.raises(RuntimeError, match="too long"):
        tokenize("word " * 100)
    t = tokenize("word " * 100, truncate=True)
    assert t[0, 0] == 49406 and t[0, -1] == 49407 and (t[0] != 0).all()
    short = tokenize("a dog", context_length=4, truncate=True)
    assert short.tolist() == [[49406, 320, 1929, 49407]]


# -- building and loading ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny"])
def test_architecture_inferred_from_state_dict(arch):
    with torch.device("meta"):  # shapes only: no memory for ViT-L/14
        sd = CLIP(**clip_model.ARCHS[arch]).state_dict()
    assert architecture(sd) == clip_model.ARCHS[arch]


def test_architecture_of_an_odd_vit():
    args = dict(embed_dim=48, image_resolution=48, vision_layers=5, vision_width=192, vision_patch_size=12,
                context_length=40, vocab_size=500, transformer_width=256, transformer_heads=4, transformer_layers=3)
    torch.manual_seed(0)
    model = build_model(CLIP(**args).state_dict())
    assert architecture(model.state_dict()) == args
    assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 48)
    assert not any(p.requires_grad for p in model.parameters())


def test_resnet_checkpoint_is_refused():
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}
    with pytest.raises(CLIPLoadError, match="only ViT backbones are supported"):
        build_model(sd)
    with pytest.raises(CLIPLoadError, match="only ViT"):
        clip_model.resolve_path("RN50")


def test_load_torchscript_archive_and_state_dict(tmp_path, tiny):
    sd_path = tmp_path / "plain.pt"
    torch.save({k: v.half() for k, v in tiny.state_dict().items()}, sd_path)
    jit_path = tmp_path / "archive.pt"
    with pytest.warns(Warning):  # tracing warns about the data-dependent EOT truncation
        traced = torch.jit.trace(tiny, (torch.randn(1, 3, 32, 32), tokenize("a dog")), check_trace=False)
    traced.save(str(jit_path))
    x, tok = torch.randn(2, 3, 32, 32), tokenize(["a cat", "a photo of a dog"])
    for path in (sd_path, jit_path):
        model = clip_model.load(str(path))
        assert model.dtype == torch.float32
        with torch.no_grad():
            expected = tiny.encode_text(tok) if path == jit_path else build_model(torch.load(sd_path)).encode_text(tok)
            torch.testing.assert_close(model.encode_text(tok), expected)
            assert model.encode_image(x).shape == (2, 64)


def test_missing_weights_give_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_model, "CACHE_DIR", str(tmp_path))
    with pytest.raises(CLIPLoadError) as err:
        clip_model.load("ViT-B/16")
    msg = str(err.value)
    assert "\n" not in msg and os.path.join(str(tmp_path), "ViT-B-16.pt") in msg
    assert "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt" in msg
    with pytest.raises(CLIPLoadError, match="not found"):
        clip_model.load(str(tmp_path / "nope.pt"))


def test_corrupted_checkpoint_gives_one_line(tmp_path, tiny):
    path = tmp_path / "cut.pt"
    torch.save(tiny.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CLIPLoadError, match="corrupted"):
        clip_model.load(str(path))


def test_random_vit_b16_encodes_on_cpu():
    model = random_clip("ViT-B/16")
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, 512)
        assert model.encode_text(tokenize(["a photo of a dog."])).shape == (1, 512)


# -- prompt hooks ---------------------------------------------------------------------------------

def test_eot_truncated_text_pass_equals_full_pass(tiny):
    tok = tokenize(["a", "a photo of a very small and oddly named dog breed.", "x y"])
    emb = tiny.token_embeddings(tok)
    deep = [torch.randn(2, 128) for _ in range(8)]
    with torch.no_grad():
        for d in ((), deep):
            short = tiny.encode_text_embeddings(emb, tok, d, truncate=True)
            full = tiny.encode_text_embeddings(emb, tok, d, truncate=False)
            torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_text_deep_prompt_changes_output_only_where_injected(tiny):
    tok = tokenize(["a photo of a dog.", "a cat."])
    emb = tiny.token_embeddings(tok)
    deep = [torch.randn(2, 128) for _ in range(8)]
    with torch.no_grad():
        base = tiny.encode_text_embeddings(emb, tok, deep)
        for i in (0, 7):
            changed = [d.clone() for d in deep]
            changed[i] += 1.0
            assert not torch.allclose(tiny.encode_text_embeddings(emb, tok, changed), base)
    # a deep prompt replaces positions 1..M: the token embeddings there no longer matter after block 1
    x = torch.zeros(2, 5, 128)
    assert torch.equal(clip_model.replace_tokens(x, torch.ones(2, 128), slice(1, 3))[:, 1:3], torch.ones(2, 2, 128))


def test_visual_prompts_shallow_and_deep(tiny):
    x = torch.randn(2, 3, 32, 32)
    shallow, deep = torch.randn(4, 128), [torch.randn(4, 128) for _ in range(8)]
    with torch.no_grad():
        plain = tiny.encode_image(x)
        prompted = tiny.encode_image(x, shallow, deep)
        assert not torch.allclose(plain, prompted)
        changed = [d.clone() for d in deep]
        changed[3] += 1.0
        assert not torch.allclose(tiny.encode_image(x, shallow, changed), prompted)
        # deep prompts replace the last M tokens: with deep prompts at every level after 0, the
        # shallow prompt still matters through block 0
        assert not torch.allclose(tiny.encode_image(x, shallow + 1.0, deep), prompted)
    with pytest.raises(AssertionError):
        tiny.encode_image(x, shallow, [torch.randn(4, 128) for _ in range(12)])


def test_gradients_reach_prompts_not_clip(tiny):
    tok = tokenize(["a dog."])
    ctx = torch.randn(2, 128, requires_grad=True)
    emb = tiny.token_embeddings(tok)
    emb = torch.cat([emb[:, :1], ctx[None], emb[:, 3:]], dim=1)
    tiny.encode_text_embeddings(emb, tok).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())
