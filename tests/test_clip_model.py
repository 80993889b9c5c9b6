"""CLIP parity, tokenizer ids, loader errors and the prompt hooks of clip_model.py."""
import copy
import os

import pytest
import torch
from torch import nn

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_random_vit_b16_encodes_on_cpu():
    model = random_clip("ViT-B/16")
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, 512)
        assert model.encode_text(tokenize(["a photo of a dog."])).shape == (1, 512)


@pytest.mark.parametrize("seed", [0, 3])
def test_each_tiny_clip_is_a_fresh_initialisation_of_its_own(seed, monkeypatch):
    """random_clip('tiny') copies a model built once per seed: built or copied, it equals a fresh
    initialisation bit for bit, is a model of its own, and leaves torch's RNG where initialising leaves it."""
    monkeypatch.setattr(clip_model, "_TINY", {})   # the first call builds, the later ones copy
    torch.manual_seed(seed)
    fresh = CLIP(**clip_model.ARCHS["tiny"])
    after = torch.get_rng_state()
    models = []
    for state in (1, 2, 3):
        torch.manual_seed(100 + state)   # whatever the RNG held before
        models.append(random_clip("tiny", seed))
        assert torch.equal(torch.get_rng_state(), after), state
        assert torch.randn(3).tolist() == torch.randn(3, generator=torch.Generator().set_state(after)).tolist()
        torch.set_rng_state(after)
    expected = fresh.state_dict()
    for model in models:
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], t) for k, t in expected.items())
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        models[1].positional_embedding.add_(1.0)
    assert torch.equal(models[0].positional_embedding, models[2].positional_embedding)   # no model is shared
    assert not torch.equal(models[0].positional_embedding, models[1].positional_embedding)


def test_module_copy_is_deepcopy_and_shares_nothing_it_could_change():
    """module_copy against copy.deepcopy on a CLIP that holds hooks, a buffer, a tensor attribute and a
    trainable parameter: the same modules, attributes and values; then every change to the copy (in-place
    writes to every tensor, a new hook, train mode, a new parameter, buffer or module) leaves the original
    as it was."""
    original = random_clip("tiny", 1)
    original.visual.register_buffer("mean", torch.randn(3))
    original.ln_final.extra = torch.ones(2)
    original.visual.proj.requires_grad_(True)
    original.ln_final.register_forward_hook(lambda module, args, out: None)
    original.transformer.train()
    reference, copied = copy.deepcopy(original), clip_model.module_copy(original)
    for (name, a), (_, b) in zip(reference.named_modules(), copied.named_modules(), strict=True):
        assert type(a) is type(b) and vars(a).keys() == vars(b).keys() and a.training == b.training, name
        for key, value in vars(a).items():
            other = vars(b)[key]
            if isinstance(value, dict):
                assert value.keys() == other.keys() and type(value) is type(other), (name, key)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (name, key)
            else:
                assert value == other, (name, key)
    for (name, a), (_, b) in zip(reference.state_dict(keep_vars=True).items(),
                                 copied.state_dict(keep_vars=True).items(), strict=True):
        assert torch.equal(a, b) and type(a) is type(b) and a.requires_grad == b.requires_grad, name
    before = copy.deepcopy(original)
    tensors = [t for m in copied.modules() for t in [*m._parameters.values(), *m._buffers.values(),
                                                      *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]]
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                t.add_(1.0)
    copied.ln_final.register_forward_hook(lambda module, args, out: None)
    copied.visual.register_forward_pre_hook(lambda module, args: None)
    copied.train()
    copied.ln_final.register_parameter("p", nn.Parameter(torch.ones(1)))
    copied.visual.register_buffer("b", torch.ones(1))
    copied.transformer.resblocks.add_module("extra", nn.Identity())
    assert len(original.ln_final._forward_hooks) == 1 and not original.visual._forward_pre_hooks
    assert [m.training for m in original.modules()] == [m.training for m in before.modules()]
    assert "p" not in original.ln_final._parameters and "b" not in original.visual._buffers
    assert len(original.transformer.resblocks) == len(before.transformer.resblocks)
    assert torch.equal(original.ln_final.extra, before.ln_final.extra)
    for (name, a), (_, b) in zip(original.state_dict().items(), before.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


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
    torch.manual_seed(0)   # not the global state other tests leave behind (the order differs with xdist)
    deep = [torch.randn(2, 128) for _ in range(8)]
    with torch.no_grad():
        base = tiny.encode_text_embeddings(emb, tok, deep)
        for i in (0, 7):
            changed = [d.clone() for d in deep]
            # not a constant: a LayerNorm removes one exactly, so the last injected layer (7) would then
            # change the output by rounding alone (allclose or not depending on the random draw)
            changed[i] += torch.linspace(-1.0, 1.0, 128)
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
        tiny.encode_image(x, shallow, [torch.randn(4, 128) for _ in range(tiny.visual.transformer.layers)])


def test_gradients_reach_prompts_not_clip(tiny):
    tok = tokenize(["a dog."])
    ctx = torch.randn(2, 128, requires_grad=True)
    emb = tiny.token_embeddings(tok)
    emb = torch.cat([emb[:, :1], ctx[None], emb[:, 3:]], dim=1)
    tiny.encode_text_embeddings(emb, tok).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


# -- OpenAI's TorchScript archives are read as data: their code never runs --------------------------

def traced_archive(model, path, dtype=torch.float32):
    with pytest.warns(Warning):  # tracing warns about the data-dependent EOT truncation
        traced = torch.jit.trace(model, (torch.randn(1, 3, 32, 32), tokenize("a dog")), check_trace=False)
    traced.to(dtype).save(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # OpenAI's archives hold fp16
def test_a_torchscript_archive_reads_as_torch_jit_load_would(tmp_path, tiny, dtype):
    path = traced_archive(random_clip("tiny", seed=3), tmp_path / "archive.pt", dtype)
    with pytest.warns(FutureWarning):
        expected = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    got = clip_model.read_state_dict(str(path))
    assert got.keys() == expected.keys() and len(got) == len(tiny.state_dict())
    assert all(got[k].dtype == dtype and torch.equal(got[k], expected[k]) for k in got)


def payload_archive(path, marker):
    """A TorchScript archive whose __setstate__, compiled and run by torch.jit.load, creates `marker`
    (torch.from_file with shared=True opens the file for writing): what a hostile --clip file can do."""
    import io
    import zipfile

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        @torch.jit.export
        def __getstate__(self):
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]):
            self.w = state[0]
            self.training = state[1]

        def forward(self, x):
            return x

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Module()), buffer)
    payload = (f"    self.training = (state)[1]\n    _t = torch.from_file(\"{marker}\", True, 4, dtype=0)\n"
               f"    _u = torch.copy_(_t, torch.tensor([111, 119, 110, 10]))\n"
               f"    self.training = bool(torch.gt(torch.sum(_u), -1)) and (state)[1]\n")
    edited = 0
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if "/code/" in info.filename and info.filename.endswith(".py") and b"(state)[1]\n" in body:
                body, edited = body.decode().replace("    self.training = (state)[1]\n", payload).encode(), edited + 1
            if not info.filename.endswith(".debug_pkl"):
                dst.writestr(info, body)
    assert edited == 1
    return path


def test_a_torchscript_archive_never_runs_its_code(tmp_path, capsys):
    import train_backbone as tb
    control = tmp_path / "control"
    with pytest.warns(FutureWarning):
        torch.jit.load(str(payload_archive(tmp_path / "control.pt", control)))
    assert control.exists()   # torch.jit.load runs it: the payload is real
    marker = tmp_path / "marker"
    evil = payload_archive(tmp_path / "evil.pt", marker)
    with pytest.raises(CLIPLoadError, match="not a CLIP ViT state dict"):
        clip_model.load(str(evil))
    with pytest.raises(SystemExit) as e:
        tb.run(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", str(evil),
                "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_torchscript_archive_that_pickles_other_globals_is_refused(tmp_path, tiny):
    import pickle
    import zipfile
    path = traced_archive(tiny, tmp_path / "archive.pt")
    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):   # the module's pickle replaced by os.system(...)
                body = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
                assert pickle.loads.__name__   # (never called on it)
            dst.writestr(info, body)
    with pytest.raises(CLIPLoadError, match="refusing to read the TorchScript archive .*posix.system"):
        clip_model.read_state_dict(str(hostile))


def test_tensors_that_do_not_fit_their_storage_are_refused(tmp_path, tiny):
    state = dict(tiny.state_dict())
    state["logit_scale"] = torch.zeros(1).expand(2 ** 30)   # a stride-0 view claiming 4 GB of 4 bytes
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(CLIPLoadError, match="logit_scale is a view of .* that does not fit its storage"):
        clip_model.read_state_dict(str(tmp_path / "wide.pt"))
    state["logit_scale"] = torch.zeros((), device="meta")
    torch.save(state, tmp_path / "meta.pt")
    with pytest.raises(CLIPLoadError, match="logit_scale is not a dense real CPU tensor"):
        clip_model.read_state_dict(str(tmp_path / "meta.pt"))


def handmade_archive(path, tensors: dict):
    """A minimal TorchScript-layout zip (data.pkl, constants.pkl, data/<key>) whose root module holds
    `tensors`, each given as (storage bytes, dtype's storage class, offset, size, stride): the pickle can
    claim any view of a storage, as a hostile file would."""
    import collections
    import io
    import pickle
    import sys
    import types
    import zipfile

    module = types.ModuleType("__torch__")   # the namespace of TorchScript's classes
    saved = sys.modules.get("__torch__")
    sys.modules["__torch__"] = module

    class Root:
        def __reduce__(self):
            return Root, (), {name: View(*spec, key=str(i)) for i, (name, spec) in enumerate(tensors.items())}

    class View:
        def __init__(self, raw, storage_class, offset, size, stride, key):
            self.storage, self.args = Storage(raw, storage_class, key), (offset, size, stride)

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (self.storage, *self.args, False, collections.OrderedDict())

    class Storage:
        def __init__(self, raw, storage_class, key):
            self.raw, self.storage_class, self.key = raw, storage_class, key

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", obj.storage_class, obj.key, "cpu", len(obj.raw) // 4)
            return None

    Root.__module__, Root.__qualname__ = module.__name__, "Root"
    module.Root = Root
    buffer = io.BytesIO()
    try:
        Pickler(buffer, protocol=2).dump(Root())
    finally:
        sys.modules.pop("__torch__")
        if saved is not None:
            sys.modules["__torch__"] = saved
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("handmade/data.pkl", buffer.getvalue())
        z.writestr("handmade/constants.pkl", pickle.dumps((), protocol=2))
        for i, (raw, *_rest) in enumerate(tensors.values()):
            z.writestr(f"handmade/data/{i}", raw)
    return path


def test_a_torchscript_tensor_beyond_its_storage_is_refused(tmp_path):
    four_floats = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    fine = handmade_archive(tmp_path / "fine.pt", {"w": (four_floats, torch.FloatStorage, 1, (3,), (1,))})
    assert torch.equal(clip_model.read_state_dict(str(fine))["w"], torch.tensor([1.0, 2.0, 3.0]))
    for name, view in {"past the end": (0, (100,), (1,)), "offset past the end": (3, (2,), (1,)),
                       "stride-0 giant": (0, (2 ** 31,), (0,))}.items():
        path = handmade_archive(tmp_path / "bad.pt", {"w": (four_floats, torch.FloatStorage, *view)})
        with pytest.raises(CLIPLoadError, match="cannot read CLIP checkpoint|does not fit its storage"):
            clip_model.read_state_dict(str(path))
