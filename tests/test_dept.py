"""DePT beside a learner (train_backbone.py --dept, prompts.DePT): each piece pinned to what the original
code (Koorye/DePT trainers/elp_coop.py, elp_maple.py, optim.py, train.py) computes, recomputed here by hand
on the tiny random CLIP: the FiLM maps, the head's loss on the text rows then the image rows, λ-fused raw
logits on the classes the head knows and CLIP's logits alone on any others, gradients into the prompts,
the two learning-rate groups, DePT's recipe as the defaults, the head in the checkpoint, a bit-identical
--resume, and the one-line refusals. The Dassl folder import is in tests/test_dept_dassl.py.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import backbones
import data
import precision
import prompts
import scoring
import toy_world
import train_backbone
import train_dpc
from clip_model import random_clip
from test_reliability import crashing_loader

BASE = ["red square", "blue circle", "green star", "pink heart"]
NEW = ["lime ring", "teal cross", "brown moon"]
LEARNERS = ["coop", "maple", "promptsrc"]


@pytest.fixture(scope="module")
def clip():
    return random_clip("tiny", seed=0)


def dept_learner(clip, name, seed=0, weight=0.7):
    """A DePT learner whose head is far from its start (random γ, β, W, b), so every term counts."""
    torch.manual_seed(seed)
    d = prompts.build_learner(name, clip, n_ctx=16 if name == "coop" else None, ctx_init="" if name == "coop" else None,
                              dept_classes=BASE, dept_weight=weight)
    with torch.no_grad():
        for film in (d.film_image, d.film_text):
            film.scale.copy_(1 + 0.5 * torch.randn_like(film.scale))
            film.bias.copy_(0.1 * torch.randn_like(film.bias))
        d.linear_head.weight.normal_(0, 0.5)
        d.linear_head.bias.normal_(0, 0.5)
    return d


def images(clip, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = clip.visual.input_resolution
    return torch.randn(n, 3, size, size, generator=g)


# ------------------------------------------------------------------------------------------------
# The computation
# ------------------------------------------------------------------------------------------------

def test_film_starts_as_identity_and_is_a_channelwise_affine_map_in_the_features_dtype():
    film = prompts.FiLM(8)
    assert film.scale.shape == film.bias.shape == (8,) and film.scale.dtype == torch.float32
    x = torch.randn(5, 8)
    assert torch.equal(film(x), x)                            # γ = 1, β = 0 at the start
    with torch.no_grad():
        film.scale.copy_(torch.arange(8.0))
        film.bias.copy_(-torch.arange(8.0) / 2)
    assert torch.allclose(film(x), x * torch.arange(8.0) - torch.arange(8.0) / 2)
    assert film(x.bfloat16()).dtype == torch.bfloat16         # γ, β cast to the feature's dtype (fp16 runs)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_training_loss_is_the_lambda_weighted_sum_of_clip_ce_and_the_head_ce_on_text_then_image_rows(clip, name):
    d = dept_learner(clip, name)
    x, y = images(clip), torch.tensor([0, 1, 1, 3, 0, 0])    # repeated classes: repeated identical text rows
    out = d.training_loss(x, y, BASE)
    v, t = d.learner.encode_image(x), d.learner.encode_text(BASE)                # raw (B, E), (C, E)
    scale = d.learner.clip.logit_scale.exp()                                      # 100 in OpenAI's CLIP
    s = scale * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()                # (B, C)
    text_rows = d.film_text.scale * t[y] + d.film_text.bias                       # (B, E) one per image
    image_rows = d.film_image.scale * v + d.film_image.bias                       # (B, E)
    head = torch.cat([text_rows, image_rows]) @ d.linear_head.weight.t() + d.linear_head.bias   # (2B, C)
    cat = F.cross_entropy(head, torch.cat([y, y]))
    own = F.cross_entropy(s, y) if name != "promptsrc" else d.learner.training_loss(x, y, BASE)["loss"]
    assert torch.allclose(out["cat"], cat, atol=1e-5)
    assert torch.allclose(out["loss"], 0.3 * own + 0.7 * cat, atol=1e-5)
    assert not torch.allclose(out["loss"], own, atol=1e-3)   # the head's term is not negligible here


@pytest.mark.parametrize("name", ["coop", "maple"])
def test_the_head_loss_alone_trains_every_prompt_tensor(clip, name):
    """No detach anywhere: with λ = 1 only the head's term is left, and it reaches every prompt tensor (MaPLe:
    through the text rows and through its visual prompts in v)."""
    d = dept_learner(clip, name, weight=1.0)
    d.training_loss(images(clip), torch.tensor([0, 1, 2, 3, 0, 1]), BASE)["loss"].backward()
    prompt = {n: p for n, p in d.named_parameters() if p.requires_grad and n.startswith("learner.")}
    assert len(prompt) == (1 if name == "coop" else 27)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.values())
    assert all(p.grad is None for n, p in d.named_parameters() if n.startswith("learner.clip."))


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_base_logits_fuse_raw_logits_and_other_classes_get_clips_logits_alone(clip, name):
    d = dept_learner(clip, name).eval()
    x = images(clip)
    with torch.no_grad():
        v = d.learner.encode_image(x)
        s = d.learner(x, BASE)                                     # exp(logit_scale) · cos, the learner's logits
        head = (d.film_image.scale * v + d.film_image.bias) @ d.linear_head.weight.t() + d.linear_head.bias
        assert torch.allclose(d(x, BASE), 0.3 * s + 0.7 * head, atol=1e-4)       # logits, not probabilities
        assert torch.equal(d(x, NEW), d.learner(x, NEW))                         # new classes: s only
        assert torch.equal(d(x, BASE[:2] + NEW[:1]), d.learner(x, BASE[:2] + NEW[:1]))   # any unknown class: s only
        # a subset of the head's classes in another order (ImageNet-A/-R): those rows of the head, by name
        subset = [BASE[3], BASE[0]]
        fused = 0.3 * d.learner(x, subset) + 0.7 * head[:, [3, 0]]
        assert torch.allclose(d(x, subset), fused, atol=1e-4)
        assert not torch.allclose(d(x, BASE), s, atol=1e-2)


def test_trainable_tensors_are_the_prompt_plus_film_and_head(clip):
    coop, maple = dept_learner(clip, "coop"), dept_learner(clip, "maple")
    head = ["film_image.bias", "film_image.scale", "film_text.bias", "film_text.scale", "linear_head.bias",
            "linear_head.weight"]
    assert sorted(prompts.trainable_parameters(coop)) == sorted(["learner.ctx"] + head)     # DePT's 7 for CoOp
    assert len(prompts.trainable_parameters(maple)) == 33                                 # MaPLe's 27 + 6
    assert coop.learner.ctx.shape == (16, clip.ln_final.weight.shape[0])                   # 16 random tokens
    assert coop.linear_head.weight.shape == (len(BASE), clip.text_projection.shape[1])
    assert set(prompts.learner_state(coop)) == {"learner.ctx", *head}                       # no CLIP copy
    with pytest.raises(prompts.LearnerError, match="PromptKD \\+ DePT is not defined"):
        prompts.DePT(prompts.PromptKD(clip, prompts.PromptSRC(clip)), BASE)


# ------------------------------------------------------------------------------------------------
# train_backbone.py --dept: recipe, learning rates, checkpoint, resume, refusals
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy_world.make_synthetic_imagefolder(str(root), "synthetic")   # 10 classes: 5 base, 5 new
    return str(root)


def argv(data_root, *extra):
    return ["--learner", "coop", "--dept", "--data", "synthetic", "--root", data_root, "--clip", "tiny",
            "--workers", "0", "--shots", "4", *extra]


def test_dept_defaults_are_depts_recipe_and_flags_still_win(data_root):
    a = train_backbone.get_args(argv(data_root))
    assert (a.epochs, a.lr, a.batch_size, a.n_ctx, a.ctx_init, a.dept_weight) == (10, 0.0035, 4, 16, "", 0.7)
    assert a.output_dir == os.path.join("output", "synthetic", "coop_dept", "seed1")
    m = train_backbone.get_args(argv(data_root)[:1] + ["maple"] + argv(data_root)[2:])
    assert (m.epochs, m.lr, m.batch_size, m.n_ctx, m.ctx_init) == (10, 0.0035, 4, 2, "a photo of a")
    s = train_backbone.get_args(argv(data_root)[:1] + ["promptsrc"] + argv(data_root)[2:])
    assert (s.epochs, s.lr, s.batch_size) == (20, 0.0025, 32)                 # our extension: PromptSRC's own
    mine = train_backbone.get_args(argv(data_root, "--epochs", "3", "--lr", "0.01", "--n-ctx", "4", "--ctx-init",
                                        "a photo of a", "--dept-weight", "0.5"))
    assert (mine.epochs, mine.lr, mine.n_ctx, mine.ctx_init, mine.dept_weight) == (3, 0.01, 4, "a photo of a", 0.5)
    plain = train_backbone.get_args([x for x in argv(data_root) if x != "--dept"])
    assert (plain.epochs, plain.lr, plain.batch_size, plain.ctx_init) == (20, 0.002, 32, None)


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A 3-epoch CoOp + DePT run, and the same run interrupted (Ctrl-C) in its third epoch."""
    cwd = tmp_path_factory.mktemp("dept_runs")
    flags = argv(data_root, "--epochs", "3", "--batch-size", "8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        results = train_backbone.main(train_backbone.get_args(flags + ["--output-dir", "straight"]))
        mp.setattr(data, "make_loader", crashing_loader(data.make_loader, 3))
        for folder in ("cut", "cut_too"):   # the second for the --resume flag check
            with pytest.raises(SystemExit) as exit_:
                train_backbone.run(flags + ["--output-dir", folder])
            assert exit_.value.code == 130
    return dict(cwd=cwd, flags=flags, results=results)


def checkpoint(run, folder):
    return torch.load(run["cwd"] / folder / "checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_head_learns_at_six_and_a_half_times_the_prompts_lr_except_in_the_warmup_epoch(run, monkeypatch):
    """Two SGD groups as DePT's optim.py: the prompt at lr, FiLM + head at 6.5·lr; both 1e-5 in epoch 1;
    momentum 0.9 and weight decay 5e-4 on both (the FiLM γ too)."""
    seen = []
    real = torch.optim.SGD.step

    def step(self, closure=None):
        seen.append([(g["lr"], g["momentum"], g["weight_decay"], len(g["params"])) for g in self.param_groups])
        return real(self, closure)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.chdir(run["cwd"])
    train_backbone.main(train_backbone.get_args(run["flags"] + ["--output-dir", "lrs"]))
    per_epoch = [seen[0], seen[len(seen) // 3], seen[-1]]   # 2 steps an epoch (20 images, batch 8)
    assert len(seen) == 6
    lr = [1e-5, train_backbone.lr_at(2, 0.0035, 3), train_backbone.lr_at(3, 0.0035, 3)]
    for epoch, groups in enumerate(per_epoch):
        (prompt_lr, *rest0), (head_lr, *rest1) = groups
        assert rest0 == [0.9, 5e-4, 1] and rest1 == [0.9, 5e-4, 6]
        assert prompt_lr == pytest.approx(lr[epoch])
        assert head_lr == pytest.approx(1e-5 if epoch == 0 else 6.5 * lr[epoch])


@pytest.mark.slow
def test_the_checkpoint_holds_the_head_and_reloads_to_the_same_numbers(run):
    ckpt = checkpoint(run, "straight")
    assert ckpt["args"]["dept"] and ckpt["state"]["linear_head.weight"].shape[0] == len(ckpt["classnames"]) == 5
    assert not torch.equal(ckpt["state"]["film_image.scale"], torch.ones_like(ckpt["state"]["film_image.scale"]))
    learner, _, _ = backbones.load_backbone(str(run["cwd"] / "straight"), "cpu")
    assert isinstance(learner, prompts.DePT) and learner.classnames == ckpt["classnames"]
    results = json.loads((run["cwd"] / "straight" / "results.json").read_text())
    assert results["kind"] == "dept" and results["base"] == run["results"]["base"]
    splits = data.load_splits("synthetic", ckpt["args"]["root"], 4, 1)
    assert scoring.base_to_new(learner, splits, "cpu") == run["results"]


@pytest.mark.slow
def test_base_accuracy_is_scored_with_the_fused_logits(run):
    """scoring.accuracy takes the argmax of the fused logits on base classes (not of the cosine alone)."""
    learner, ckpt, _ = backbones.load_backbone(str(run["cwd"] / "straight"), "cpu")
    items = data.load_splits("synthetic", ckpt["args"]["root"], 4, 1)["base"]["test"]
    names = ckpt["classnames"]
    batch = torch.stack([data.test_transform(learner.clip.visual.input_resolution)(data.load_image(i.path))
                         for i in items])
    labels = torch.tensor([i.label for i in items])
    with torch.no_grad():
        fused = (learner(batch, names).argmax(-1) == labels).float().mean().item() * 100
        assert scoring.accuracy(learner, items, names, "cpu") == pytest.approx(fused)
        learner.linear_head.weight.mul_(50)   # a head that dominates: the argmax must follow it
        learner.linear_head.bias.copy_(torch.arange(5.0) * 1e3)   # ... to the last class, whatever the image
        assert scoring.accuracy(learner, items, names, "cpu") == pytest.approx(
            100 * (labels == 4).float().mean().item())


@pytest.mark.slow
def test_a_resumed_dept_run_is_bit_identical_to_a_straight_one(run):
    straight, cut = checkpoint(run, "straight"), checkpoint(run, "cut")
    assert cut["epoch"] == 2 and not cut["finished"]
    os.chdir(run["cwd"])
    resumed = train_backbone.main(train_backbone.get_args(run["flags"] + ["--output-dir", "cut", "--resume"]))
    cut = checkpoint(run, "cut")
    assert resumed == run["results"]
    assert all(torch.equal(straight["state"][k], cut["state"][k]) for k in straight["state"])
    assert straight["optimizer"]["param_groups"][1]["lr"] == cut["optimizer"]["param_groups"][1]["lr"]


def fails(capsys, run_fn, flags, match):
    with pytest.raises(SystemExit) as e:
        run_fn(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    return err


def test_refusals_are_one_line(run, data_root, capsys, monkeypatch):
    monkeypatch.chdir(run["cwd"])
    fails(capsys, train_backbone.run, argv(data_root, "--dept-weight", "1.5"), "--dept-weight must be in [0, 1]")
    fails(capsys, train_backbone.run, argv(data_root)[:1] + ["promptkd"] + argv(data_root)[2:],
          "DePT's head needs labelled base classes")
    # --resume with or without the head is another run
    fails(capsys, train_backbone.run, [x for x in run["flags"] if x != "--dept"] + ["--output-dir", "cut_too", "--resume"],
          "--dept True -> False")
    fails(capsys, train_backbone.run, run["flags"] + ["--dept-weight", "0.5", "--output-dir", "cut_too", "--resume"],
          "--dept-weight 0.7 -> 0.5")
    # DPC is plugged into the plain backbone, beside DePT (Fig. 5), not on top of it
    fails(capsys, train_dpc.run, ["--backbone", "straight", "--workers", "0", "--output-dir", "dpc"],
          "is a DePT run (train_backbone.py --dept)")
    assert not (run["cwd"] / "dpc" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_transfer_gives_a_dept_run_its_own_row_and_clips_logits_on_a_class_set_beyond_its_head(run, monkeypatch):
    """Tab. 2 on a DePT run: its own "dept" row; all 10 classes of a test split are not the head's 5, so the
    accuracy is the learner's alone (as DePT's code, which fuses only on its own classes)."""
    import evaluate
    monkeypatch.chdir(run["cwd"])
    out = evaluate.main(evaluate.get_args(["straight", "--target", "synthetic", "--workers", "0", "--out", "xd"]))
    (row,) = out["runs"]
    learner, ckpt, _ = backbones.load_backbone(str(run["cwd"] / "straight"), "cpu")
    items = data.read_splits(ckpt["args"]["root"], "synthetic")["test"]
    assert row["kind"] == "dept" and out["mean_over_seeds"][0]["kind"] == "dept"
    assert row["accuracy"] == scoring.accuracy(learner.learner, items, data.classnames_of(items), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("coop", torch.float16), ("maple", torch.bfloat16)])   # DePT's learners
def test_dept_trains_and_scores_under_autocast(name, dtype, data_root, tmp_path, monkeypatch):
    """The GPU path on CPU (bf16 as on an H100, fp16 with loss scaling as on a V100): the head's loss on
    16-bit features, both lr groups through the scaler, fused 16-bit logits at test; finite fp32 tensors."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precision, "autocast", lambda device: torch.autocast("cpu", dtype=dtype))
    if dtype == torch.float16:
        monkeypatch.setattr(precision, "grad_scaler", lambda device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    flags = argv(data_root, "--epochs", "2", "--batch-size", "8", "--output-dir", "r")
    results = train_backbone.main(train_backbone.get_args(flags[:1] + [name] + flags[2:]))
    assert 0 <= results["base"] <= 100 and 0 <= results["new"] <= 100
    state = torch.load(os.path.join("r", "checkpoint.pt"), weights_only=True)["state"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert not torch.equal(state["film_image.scale"], torch.ones_like(state["film_image.scale"]))   # it trained
