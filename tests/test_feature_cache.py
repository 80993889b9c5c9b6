"""The image-feature cache of evaluation (scoring.image_features): an optimisation only. A
result with the cache equals the result without it bitwise; anything that could change the features
(an image file, the CLIP weights, the transform, the learner's visual prompts) misses it."""
import hashlib
import os
import shutil

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import clip_model
import data
import evaluate
import prompts
import scoring
import toy_world
import train_backbone as tb
import train_dpc


@pytest.fixture()
def cache(tmp_path):
    scoring._MEMO.clear()
    yield str(tmp_path / "cache")
    scoring._MEMO.clear()


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache_data"))
    toy_world.make_synthetic_imagefolder(root, "synthetic", n_test=7)
    return data.read_splits(root, "synthetic")["test"]   # 70 images: batches of 32, 32 and 6 below


def learner_of(name, seed=0):
    clip = clip_model.random_clip("tiny", seed)
    teacher = prompts.PromptSRC(clip_model.random_clip("tiny", 1)) if name == "promptkd" else None
    torch.manual_seed(0)
    learner = prompts.build_learner(name, clip, teacher) if name != "zeroshot" else prompts.ZeroShotCLIP(clip)
    return learner.eval()


class Counter:
    """Counts the real image passes (scoring.encode_images) while it is patched in."""

    def __init__(self, monkeypatch):
        self.calls, self.real = 0, scoring.encode_images
        monkeypatch.setattr(scoring, "encode_images", self)

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


def files_in(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs) if os.path.isdir(folder) else []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zeroshot", "coop", "maple", "promptsrc", "promptkd"])
def test_cached_results_equal_uncached_bitwise(name, items, cache, monkeypatch):
    learner = learner_of(name)
    names = data.classnames_of(items)
    counter = Counter(monkeypatch)
    with torch.no_grad():
        fresh = scoring.encode_images(learner, items, "cpu", 0, 32)
        first = scoring.image_features(learner, items, "cpu", 0, 32, cache)      # a miss: encodes
        again = scoring.image_features(learner, items, "cpu", 0, 32, cache)      # a hit: in this process
        scoring._MEMO.clear()
        disk = scoring.image_features(learner, items, "cpu", 0, 32, cache)       # plain encoder: from disk
    assert all(torch.equal(a, b) for a, b in zip(fresh, first)) and len(fresh) == len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh, again)) and all(torch.equal(a, b) for a, b in zip(fresh, disk))
    plain = not learner.image_side
    assert counter.calls == (2 if plain else 3)    # fresh + first (+ disk: prompted features never go to disk)
    assert bool(files_in(cache)) == plain
    acc = [scoring.accuracy(learner, items, names, "cpu", batch_size=32, cache=c) for c in (cache, "off", cache)]
    assert acc[0] == acc[1] == acc[2]


def test_a_changed_image_misses(items, cache, tmp_path, monkeypatch):
    learner = learner_of("coop")
    mine = [it._replace(path=str(tmp_path / f"{i}.png")) for i, it in enumerate(items[:10])]
    for it, src in zip(mine, items):
        shutil.copy(src.path, it.path)
    with torch.no_grad():
        before = scoring.image_features(learner, mine, "cpu", 0, 100, cache)
        Image.new("RGB", (32, 32), (250, 250, 250)).save(mine[3].path)   # the same file, new content
        scoring._MEMO.clear()
        counter = Counter(monkeypatch)
        after = scoring.image_features(learner, mine, "cpu", 0, 100, cache)
    assert counter.calls == 1
    assert torch.equal(after[0], scoring.encode_images(learner, mine, "cpu", 0, 100)[0])
    assert not torch.equal(after[0][3], before[0][3]) and torch.equal(after[0][:3], before[0][:3])


def test_the_weights_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    """Run folders and cache keys hold digests: tensors_digest must keep its definition, for every dtype and
    layout a state dict can hold (a transposed view is digested as its contiguous copy)."""
    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 4), "half": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "ids": torch.arange(7), "mask": torch.rand(4) > 0.5, "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "t": torch.randn(4, 3).t(), "u8": torch.randint(0, 255, (6,), dtype=torch.uint8)}
    expected = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        expected.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        raw = t.view(-1).view(torch.uint8).tolist() if t.numel() else []
        expected.update(bytes(raw))
    assert scoring.tensors_digest(tensors) == expected.hexdigest()
    assert scoring.tensors_digest(dict(tensors, w=tensors["w"] + 1e-6)) != expected.hexdigest()


@pytest.mark.slow
def test_another_clip_or_a_changed_clip_misses(items, cache, monkeypatch):
    a, b = learner_of("coop", seed=0), learner_of("coop", seed=7)
    with torch.no_grad():
        first = scoring.image_features(a, items, "cpu", 0, 100, cache)
        counter = Counter(monkeypatch)
        other = scoring.image_features(b, items, "cpu", 0, 100, cache)
        assert counter.calls == 1 and not torch.equal(first[0], other[0])
        a.clip.visual.proj.mul_(1.5)                      # the same model object, weights changed in place
        changed = scoring.image_features(a, items, "cpu", 0, 100, cache)
    assert counter.calls == 2 and not torch.equal(first[0], changed[0])
    assert torch.equal(changed[0], scoring.encode_images(a, items, "cpu", 0, 100)[0])


@pytest.mark.slow
def test_another_transform_misses(items, cache, monkeypatch):
    learner = learner_of("coop")
    with torch.no_grad():
        scoring.image_features(learner, items, "cpu", 0, 100, cache)
        bilinear = lambda size=224: T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR),  # noqa: E731
                                               T.CenterCrop(size), T.ToTensor(), T.Normalize(data.CLIP_MEAN, data.CLIP_STD)])
        monkeypatch.setattr(data, "test_transform", bilinear)   # bicubic elsewhere
        counter = Counter(monkeypatch)
        scoring._MEMO.clear()
        scoring.image_features(learner, items, "cpu", 0, 100, cache)
    assert counter.calls == 1


@pytest.mark.slow
def test_other_visual_prompts_miss_and_equal_ones_hit(items, cache, monkeypatch):
    learner = learner_of("promptsrc")
    counter = Counter(monkeypatch)
    with torch.no_grad():
        base = scoring.image_features(learner, items, "cpu", 0, 100, cache)
        with prompts.substitute(learner, {"ctx": learner.ctx + 1.0}):          # text side only: the same f(V)
            scoring.image_features(learner, items, "cpu", 0, 100, cache)
        assert counter.calls == 1
        with prompts.substitute(learner, {"visual_prompt": learner.visual_prompt + 0.1}):
            moved = scoring.image_features(learner, items, "cpu", 0, 100, cache)
    assert counter.calls == 2
    assert not torch.equal(moved[0], base[0])


DAMAGES = {   # what a damaged or planted cache file may hold instead of [(B, E), ...]
    "garbage bytes": None,
    "another width": lambda good: [f[:, :7].clone() for f in good],
    "other batches": lambda good: [torch.cat(good)],
    "rows of another batch size": lambda good: [g for f in good for g in f.split(10)],
    "a stride-0 view": lambda good: [torch.zeros(1).expand(f.shape) for f in good],
    "not a list": lambda good: {"features": good},
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_file_is_a_miss(items, cache, monkeypatch, damage):
    learner = learner_of("coop")
    with torch.no_grad():
        good = scoring.image_features(learner, items, "cpu", 0, 32, cache)   # 70 images: batches of 32, 32, 6
        (path,) = files_in(cache)
        if DAMAGES[damage] is None:
            open(path, "wb").write(b"garbage")
        else:
            torch.save(DAMAGES[damage](good), path)
        scoring._MEMO.clear()
        counter = Counter(monkeypatch)
        again = scoring.image_features(learner, items, "cpu", 0, 32, cache)
    assert counter.calls == 1 and len(again) == len(good) and all(torch.equal(a, b) for a, b in zip(good, again))


@pytest.mark.slow
def test_off_never_writes(items, cache):
    learner = learner_of("coop")
    with torch.no_grad():
        scoring.image_features(learner, items, "cpu", 0, 100, "off")
    assert not files_in(cache) and not scoring._MEMO


# -- across processes and within evaluate.py ------------------------------------------------------

def run_coop_and_dpc(base, cache):
    common = ["--data", "synthetic", "--root", str(base / "data"), "--clip", "tiny", "--workers", "0",
              "--feature-cache", cache]
    tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "8", "--shots", "4",
                         "--output-dir", "coop"] + common))
    scoring._MEMO.clear()   # as if train_dpc.py were another process
    return train_dpc.main(train_dpc.get_args(["--backbone", "coop", "--epochs", "1", "--workers", "0", "--shots", "4",
                                              "--output-dir", "dpc", "--feature-cache", cache]))


@pytest.mark.slow
def test_a_dpc_run_reuses_its_coop_backbones_test_features(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = scoring.encode_images
    calls = []
    monkeypatch.setattr(scoring, "encode_images", lambda *a: calls.append(1) or real(*a))
    with_cache = run_coop_and_dpc(tmp_path, cache)
    assert len(calls) == 2           # base and new test splits, once, by the backbone run
    assert len(files_in(cache)) == 2
    scoring._MEMO.clear()   # another seed, another process: the test split is the same, so are its features
    tb.main(tb.get_args(["--learner", "coop", "--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny",
                         "--workers", "0", "--epochs", "1", "--batch-size", "8", "--shots", "4", "--seed", "2",
                         "--output-dir", "coop2", "--feature-cache", cache]))
    assert len(calls) == 2
    shutil.rmtree("coop"), shutil.rmtree("dpc")
    without = run_coop_and_dpc(tmp_path, "off")
    assert len(calls) == 6 and without == with_cache


@pytest.mark.slow
def test_sweeps_encode_once_per_distinct_visual_prompt(tmp_path, cache, monkeypatch):
    """CoOp: one image pass for the whole ω_n sweep (none, even: the training run left them cached);
    PromptSRC: one per distinct P̃_n, where ω_n = 0 twice gives P twice."""
    monkeypatch.chdir(tmp_path)
    # 4 train and 2 test images a class (the default: 20 and 4): what is counted is passes, not images
    toy_world.make_synthetic_imagefolder(str(tmp_path / "data"), "synthetic", n_train=4, n_val=0, n_test=2)
    common = ["--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny", "--workers", "0",
              "--shots", "2", "--feature-cache", cache]
    for name in ("coop", "promptsrc"):
        tb.main(tb.get_args(["--learner", name, "--epochs", "1", "--batch-size", "8", "--output-dir", name] + common))
        train_dpc.main(train_dpc.get_args(["--backbone", name, "--epochs", "1", "--workers", "0", "--shots", "2",
                                           "--output-dir", f"{name}_dpc", "--feature-cache", cache]))
    scoring._MEMO.clear()
    counter = Counter(monkeypatch)
    sweep = ["--sweep", "omega_n", "--values", "0,0,1e-6,0.3,0.5,0.7,0.9,1,0.1", "--workers", "0"]
    off = evaluate.main(evaluate.get_args(["coop_dpc", "--feature-cache", "off", "--out", "a"] + sweep))
    assert counter.calls == 9
    on = evaluate.main(evaluate.get_args(["coop_dpc", "--feature-cache", cache, "--out", "b"] + sweep))
    assert counter.calls == 9 and on["runs"][0]["accuracies"] == off["runs"][0]["accuracies"]
    src_on = evaluate.main(evaluate.get_args(["promptsrc_dpc", "--feature-cache", cache, "--out", "c"] + sweep))
    assert counter.calls == 9 + 8
    src_off = evaluate.main(evaluate.get_args(["promptsrc_dpc", "--feature-cache", "off", "--out", "d"] + sweep))
    assert src_on["runs"][0]["accuracies"] == src_off["runs"][0]["accuracies"]
    # Tab. 2 (--target): every run, backbone and DPC, on its source and another dataset, cache on = off
    toy_world.make_synthetic_imagefolder(str(tmp_path / "data"), "other", n_classes=4, n_test=5, seed=3)
    target = ["coop", "coop_dpc", "promptsrc", "promptsrc_dpc", "--target", "other", "--workers", "0"]
    on = evaluate.main(evaluate.get_args(target + ["--feature-cache", cache, "--out", "e"]))
    scoring._MEMO.clear()
    off = evaluate.main(evaluate.get_args(target + ["--feature-cache", "off", "--out", "f"]))
    assert len(on["runs"]) == 8 and on["runs"] == off["runs"]


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_costs_time_not_the_run(items, cache, monkeypatch, capsys):
    """torch.save reports a read-only or full file system as a RuntimeError from its zip writer: the
    features are still returned (and equal), with one warning, and no file is left behind."""
    learner = learner_of("coop")
    with torch.no_grad():
        expected = scoring.image_features(learner, items, "cpu", 0, 100, "off")

    def read_only(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                           "Read-only file system")

    monkeypatch.setattr(torch, "save", read_only)
    with torch.no_grad():
        got = scoring.image_features(learner, items, "cpu", 0, 100, cache)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    out = capsys.readouterr().out
    assert out.count("warning: cannot write the feature cache") == 1 and "Read-only file system" in out
    assert not [f for f in files_in(cache) if os.path.isfile(f)]
