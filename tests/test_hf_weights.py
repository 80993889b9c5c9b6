"""--clip as a Hugging Face folder or hub id (hf_weights.py): parity with transformers on two small folders it
wrote itself (tools/make_hf_fixture.py: ViT-B/16- and ViT-L/14-shaped), the hub cache resolved offline, the
refusals (one line each), and one CLIP by content whatever its names or file. transformers is never imported."""
import argparse
import json
import os
import shutil
import sys

import pytest
import torch

import backbones
import clip_model
import command_line
import hf_weights
import scoring
import train_backbone

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
B16, L14 = os.path.join(FIXTURES, "hf_clip_b16"), os.path.join(FIXTURES, "hf_clip_l14")   # safetensors, .bin


def needs_safetensors(folder):
    if folder == B16:
        pytest.importorskip("safetensors")


def refusal(path) -> str:
    with pytest.raises(clip_model.CLIPLoadError) as e:
        clip_model.load(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


# -- parity with transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("folder, patch", [(B16, 16), (L14, 14)], ids=["b16-safetensors", "l14-bin"])
def test_outputs_match_what_transformers_computed(folder, patch):
    needs_safetensors(folder)
    model = clip_model.load(folder)
    ref = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)
    images, tokens = ref["images"].float(), ref["tokens"]
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(tokens)
        logits, _ = model(images, tokens)
    assert model.visual.conv1.weight.shape[-1] == patch and ref["transformers_version"] == "5.25.0"
    for ours, theirs in ((image_features, "image_features"), (text_features, "text_features"), (logits, "logits_per_image")):
        assert ours.shape == ref[theirs].shape
        assert (ours - ref[theirs]).abs().max() <= 1e-5, theirs


# -- the hub cache, offline -----------------------------------------------------------------------------

def hub_layout(cache, repo_id: str, folder: str, revision: str = "c0ffee1234"):
    """huggingface_hub's layout: refs/main names a snapshot whose files link to blobs/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), repo / "blobs" / f"{revision}-{name}")
        os.symlink(os.path.join("..", "..", "blobs", f"{revision}-{name}"), snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_id_is_read_from_the_snapshot_refs_main_names(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    hub_layout(cache, "openai/clip-vit-large-patch14", B16, revision="older")   # another snapshot, not refs/main's
    hub_layout(cache, "openai/clip-vit-large-patch14", L14, revision="c0ffee1234")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = clip_model.load("openai/clip-vit-large-patch14")
    assert model.visual.conv1.weight.shape[-1] == 14
    assert scoring.clip_digest(model) == scoring.clip_digest(clip_model.load(L14))
    assert backbones.clip_path("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"   # recorded as the id


def test_the_hub_cache_follows_huggingface_hubs_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_weights.hub_cache() == os.path.join(str(tmp_path), ".cache", "huggingface", "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_weights.hub_cache() == os.path.join(str(tmp_path / "hf"), "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_weights.hub_cache() == str(tmp_path / "elsewhere")


def test_a_hub_id_not_downloaded_is_one_line_and_nothing_is_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    message = refusal("openai/clip-vit-base-patch16")
    assert "openai/clip-vit-base-patch16 is not downloaded in the hub cache" in message and "offline" in message
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:   # what a script prints
        train_backbone.run(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"),
                            "--clip", "openai/clip-vit-base-patch16", "--workers", "0", "--output-dir", "run"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


# -- refusals, one line naming the difference -----------------------------------------------------------

def edited_copy(tmp_path, folder=L14, **edits):
    """The folder copied, its config.json edited: {"vision_config.hidden_act": "gelu", "model_type": ...}."""
    copy = tmp_path / os.path.basename(folder)
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in edits.items():
        *outer, last = key.split(".")
        (config[outer[0]] if outer else config)[last] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, message", [
    ({"vision_config.hidden_act": "gelu"}, "its vision tower uses hidden_act 'gelu', not OpenAI's quick_gelu"),
    ({"text_config.hidden_act": "gelu"}, "its text tower uses hidden_act 'gelu', not OpenAI's quick_gelu"),
    ({"model_type": "chinese_clip"}, "'chinese_clip' model (a BERT text tower without a causal mask), not CLIP"),
    ({"text_config.eos_token_id": 5}, "its text tower pools at token id 5, the vendored model at the largest id"),
    ({"vision_config.num_attention_heads": 2}, "its vision tower has 2 attention heads for width 64"),
    ({"text_config.num_hidden_layers": 3}, "config.json says text_config.num_hidden_layers 3 but its tensors have 2"),
    ({"vision_config.patch_size": 16, "vision_config.image_size": 64},
     "config.json says vision_config.patch_size 16 but its tensors have 14"),
    ({"projection_dim": 64}, "config.json says projection_dim 64 but its tensors have 48"),
])
def test_what_the_vendored_model_cannot_compute_exactly_is_refused(tmp_path, edit, message):
    copy = edited_copy(tmp_path, **edit)
    got = refusal(copy)
    assert got.startswith(f"Hugging Face folder {copy}: ") and message in got, got


def test_a_tensor_without_a_place_in_openais_clip_is_refused(tmp_path):
    copy = edited_copy(tmp_path)
    state = torch.load(copy / "pytorch_model.bin", weights_only=True)
    torch.save(dict(state, **{"text_projection.bias": torch.zeros(48)}), copy / "pytorch_model.bin")
    assert "a tensor 'text_projection.bias' that OpenAI's CLIP has no place for" in refusal(copy)


def test_pytorch_model_bin_is_read_as_data_only(tmp_path):
    copy = edited_copy(tmp_path)
    torch.save({"logit_scale": torch.zeros(()), "note": argparse.Namespace()}, copy / "pytorch_model.bin")
    assert "cannot read CLIP checkpoint" in refusal(copy)   # torch.load(weights_only=True) refuses the object


def test_a_config_setting_of_the_wrong_kind_is_one_line(tmp_path):
    assert "its config.json holds a setting of the wrong kind" in refusal(edited_copy(tmp_path, **{
        "vision_config.patch_size": 0}))


def test_a_folder_without_weights_or_config_is_one_line(tmp_path):
    copy = edited_copy(tmp_path)
    os.remove(copy / "pytorch_model.bin")
    assert "holds no model.safetensors or pytorch_model.bin" in refusal(copy)
    os.remove(copy / "config.json")
    assert "is a folder without config.json" in refusal(copy)


def test_safetensors_without_its_package_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)   # `import safetensors...` now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert refusal(B16) == f"reading {os.path.join(B16, 'model.safetensors')} needs the safetensors package: " \
                           f"pip install safetensors"


# -- one CLIP by content --------------------------------------------------------------------------------

def test_the_hf_copy_and_an_openai_named_file_of_the_same_weights_are_one_clip(tmp_path):
    hf = clip_model.load(L14)
    torch.save({k: v.half() for k, v in hf.state_dict().items()}, tmp_path / "ViT-L-14.pt")   # fp16, as OpenAI ships
    other = {k: v.clone() for k, v in hf.state_dict().items()}
    other["visual.proj"][0, 0] += 1e-3
    torch.save(other, tmp_path / "other.pt")
    run = dict(lr=0.002, clip=L14, clip_digest=scoring.clip_digest(hf))
    same = dict(lr=0.002, clip=str(tmp_path / "ViT-L-14.pt"),
                clip_digest=scoring.clip_digest(clip_model.load(str(tmp_path / "ViT-L-14.pt"))))
    differ = dict(lr=0.002, clip=str(tmp_path / "other.pt"),
                  clip_digest=scoring.clip_digest(clip_model.load(str(tmp_path / "other.pt"))))
    assert command_line.setting_differences(run, same) == []
    assert command_line.setting_differences(run, differ) == [f"--clip {L14!r} vs {differ['clip']!r} (other weights)"]
    older = dict(lr=0.002, clip=L14)   # a run from before the digest: by name
    assert command_line.setting_differences(older, dict(older)) == []
    assert command_line.setting_differences(older, same) != []
    assert backbones.clip_path(os.path.relpath(L14)) == L14   # a folder is recorded as an absolute path
