"""DPC stage end to end: Weighting-Decoupling on real learners, the training loop, the run folder."""
import contextlib
import json
import os

import pytest
import torch

import checkpoints
import clip_model
import dassl_import
import precision
import prompts
import toy_world
import train_backbone as tb
import train_dpc
from train_dpc import base_class_prompt, new_class_prompt

CLASSES = ["red stripes", "green stripes", "blue stripes"]


def make_learner(name):
    clip = clip_model.random_clip("tiny", seed=0)
    teacher = prompts.PromptSRC(clip_model.random_clip("tiny", seed=1)) if name == "promptkd" else None
    torch.manual_seed(0)
    return prompts.build_learner(name, clip, teacher).eval()


def logits(learner, images, prompt):
    with torch.no_grad(), prompts.substitute(learner, prompt):
        return learner(images, CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
def test_weighting_decoupling_on_learner_logits(name):
    learner = make_learner(name)
    images = torch.randn(3, 3, 32, 32)
    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(learner).items()}
    backbone = logits(learner, images, {})
    # at the start of training P' = P: the DPC model's base logits are the backbone's
    assert torch.equal(logits(learner, images, base_class_prompt(tuned, tuned, 0.2, "parallel")), backbone)
    # after some training P' != P
    torch.manual_seed(1)
    parallel = {n: t + 0.05 * torch.randn_like(t) for n, t in tuned.items()}
    assert not torch.allclose(logits(learner, images, base_class_prompt(parallel, tuned, 0.2, "parallel")), backbone)
    # ω_n = 0 reproduces the backbone's new-class logits exactly; 1e-6 within 1e-4
    assert torch.equal(logits(learner, images, new_class_prompt(parallel, tuned, 0.0)), backbone)
    close = logits(learner, images, new_class_prompt(parallel, tuned, 1e-6))
    assert (close - backbone).abs().max() < 1e-4
    # `mixed` with ω_b = 1 equals `parallel`
    torch.testing.assert_close(logits(learner, images, base_class_prompt(parallel, tuned, 1.0, "mixed")),
                               logits(learner, images, base_class_prompt(parallel, tuned, 1.0, "parallel")))


def test_promptkd_prompt_covers_teacher_text():
    names = set(prompts.prompt_tensors(make_learner("promptkd")))
    assert {"teacher.ctx", "teacher.text_deep.0", "visual_prompt", "projector.0.weight"} <= names
    assert not any(n.startswith(("clip.", "teacher.clip.", "teacher.visual")) for n in names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One coop backbone (1 epoch) and its DPC run (1 epoch) on synthetic data."""
    base = tmp_path_factory.mktemp("dpc")
    with contextlib.chdir(base):
        common = ["--data", "synthetic", "--root", str(base / "data"), "--clip", "tiny", "--workers", "0"]
        tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "8", "--shots", "4"] + common))
        backbone_dir = os.path.join("output", "synthetic", "coop", "seed1")
        results = train_dpc.main(train_dpc.get_args(["--topk", "8", "--epochs", "2", "--workers", "0", "--shots", "4"]))
        yield dict(base=base, backbone=base / backbone_dir, dpc=base / "output" / "synthetic" / "coop_dpc" / "seed1",
                   results=results)


@pytest.mark.slow
def test_dpc_run_folder_and_results(runs):
    dpc = runs["dpc"]
    for f in ("args.json", "log.txt", "checkpoint.pt", "results.json"):
        assert (dpc / f).is_file()
    log = (dpc / "log.txt").read_text()
    assert "warning: --topk 8 > 5 base classes; using K = 5" in log and "* accuracy:" in log
    res = json.loads((dpc / "results.json").read_text())
    backbone = json.loads((runs["backbone"] / "results.json").read_text())
    assert res["kind"] == "dpc" and 0 <= res["base"] <= 100
    assert res["new"] == backbone["new"]  # ω_n = 1e-6: new-class accuracy is the backbone's


def test_only_the_parallel_prompt_trains(runs):
    ckpt = torch.load(runs["dpc"] / "checkpoint.pt", weights_only=True)
    backbone = torch.load(runs["backbone"] / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and set(ckpt["tuned_prompt"]) == {"ctx"}
    assert torch.equal(ckpt["tuned_prompt"]["ctx"], backbone["state"]["ctx"])   # P did not move
    assert not torch.equal(ckpt["parallel_prompt"]["ctx"], backbone["state"]["ctx"])  # P' did
    assert os.path.getsize(runs["dpc"] / "checkpoint.pt") < 100_000                # no CLIP inside


def test_finished_dpc_run_is_not_overwritten(runs, capsys):
    before = (runs["dpc"] / "checkpoint.pt").read_bytes()
    with contextlib.chdir(runs["base"]):
        with pytest.raises(SystemExit) as exit_:
            train_dpc.run(["--backbone", str(runs["backbone"]), "--workers", "0", "--shots", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite" in err[0]
    assert (runs["dpc"] / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--topk", "1"], "--topk must be at least 2"),
    (["--omega-b", "0"], "--omega-b must be in (0, 1]"),
    (["--omega-n", "1.5"], "--omega-n must be in [0, 1]"),
    (["--epochs", "0"], "--epochs must be positive"),
])
def test_bad_dpc_flags_give_one_line(runs, capsys, flags, message, tmp_path):
    with contextlib.chdir(runs["base"]):
        with pytest.raises(SystemExit) as exit_:
            train_dpc.run(["--backbone", str(runs["backbone"]), "--workers", "0", "--shots", "4",
                           "--output-dir", str(tmp_path / "x")] + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0]


def test_backbone_folder_without_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_dpc.run(["--backbone", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished backbone run" in err[0]


def test_dassl_checkpoint_renames():
    state = {"prompt_learner.ctx": torch.zeros(4, 8).half(), "image_encoder.VPT": torch.zeros(4, 16),
             "image_encoder.transformer.resblocks.1.VPT_shallow": torch.ones(4, 16),
             "text_encoder.transformer.resblocks.8.VPT_shallow": torch.ones(4, 8),
             "image_encoder.conv1.weight": torch.zeros(1), "prompt_learner.token_prefix": torch.zeros(1)}
    out = dassl_import.dassl_state("promptsrc", state)
    assert set(out) == {"ctx", "visual_prompt", "visual_deep.0", "text_deep.7"}
    assert out["ctx"].dtype == torch.float32
    assert set(dassl_import.dassl_state("coop", {"ctx": torch.zeros(4, 8), "token_prefix": torch.zeros(1)})) == {"ctx"}


@pytest.mark.slow
def test_dassl_coop_folder_is_accepted(tmp_path, runs):
    learner = make_learner("coop")
    folder = tmp_path / "dassl" / "prompt_learner"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"ctx": learner.ctx.detach().half(), "token_prefix": torch.zeros(1)}, "epoch": 20},
               folder / "model.pth.tar-20")
    with contextlib.chdir(runs["base"]):
        res = train_dpc.main(train_dpc.get_args(["--backbone", str(tmp_path / "dassl"), "--data", "synthetic",
                                                 "--root", str(runs["base"] / "data"), "--clip", "tiny", "--epochs", "1",
                                                 "--workers", "0", "--shots", "4", "--output-dir", str(tmp_path / "out")]))
    assert 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maple", "promptsrc", "promptkd"])
def test_end_to_end_other_learners(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny", "--workers", "0"]
    extra = []
    if name == "promptkd":
        tb.main(tb.get_args(["--learner", "promptsrc", "--epochs", "1", "--batch-size", "8", "--shots", "2",
                             "--output-dir", "teacher"] + common))
        extra = ["--teacher", "teacher", "--shots", "2"]
    else:
        extra = ["--shots", "2"]
    tb.main(tb.get_args(["--learner", name, "--epochs", "1", "--batch-size", "8"] + extra + common))
    pool = ["--negative-pool", "full"] if name == "maple" else []   # negatives from the full base train split
    res = train_dpc.main(train_dpc.get_args(["--epochs", "1", "--workers", "0", "--shots", "2"] + pool))
    backbone = json.loads(open(os.path.join("output", "synthetic", name, "seed1", "results.json")).read())
    assert abs(res["new"] - backbone["new"]) < 1e-9 and 0 <= res["base"] <= 100
    if pool:  # 5 base classes x 20 train images of the synthetic set, not the 2-shot set
        assert "negatives from 100 (full)" in open(os.path.join("output", "synthetic", "maple_dpc", "seed1", "log.txt")).read()


@pytest.mark.slow
def test_cross_dataset_source_trains_on_all_classes(tmp_path, monkeypatch):
    """Tab. 2: a source run on all classes, its DPC run, and both tested on another class list."""
    monkeypatch.chdir(tmp_path)
    common = ["--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny", "--workers", "0"]
    res = tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "8", "--shots", "2",
                               "--subsample", "all"] + common))
    assert set(res) == {"all"} and 0 <= res["all"] <= 100
    ckpt = torch.load(os.path.join("output", "synthetic", "coop", "seed1", "checkpoint.pt"), weights_only=True)
    assert len(ckpt["classnames"]) == 10   # all classes of the synthetic set
    dpc = train_dpc.main(train_dpc.get_args(["--epochs", "1", "--workers", "0", "--shots", "2"]))
    assert set(dpc) == {"all"}
    import evaluate
    out = evaluate.main(evaluate.get_args(["output", "--target", "synthetic", "--out", "ev"]))
    assert out and os.path.isfile(os.path.join("ev", "transfer.json"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
def test_image_side_tells_the_truth(name):
    """DPC reuses, and evaluation caches, image features by what `image_side` says f(V) reads: moving
    any of those tensors changes f(V), moving any other tensor of the learner leaves it bitwise equal."""
    learner = make_learner(name)
    images = torch.randn(2, 3, 32, 32)
    own = {n: t for n, t in learner.named_parameters() if not n.startswith(prompts.FROZEN)}
    own.update({n: t for n, t in prompts.prompt_tensors(learner).items()})   # PromptKD: the teacher's text prompts
    side = set(prompts.image_side_tensors(learner))
    assert side <= set(own) | {n for n, _ in learner.named_buffers()}
    with torch.no_grad():
        before = learner.encode_image(images)
        for n, t in own.items():
            torch.manual_seed(2)
            with prompts.substitute(learner, {n: t.detach() + 0.1 * torch.randn_like(t)}):
                moved = not torch.equal(learner.encode_image(images), before)
            assert moved == (n in side), n


# -- Eq. (5) at step 0: the untrained DPC model is the backbone, bit for bit --------------------------

NAMED_OMEGAS = [1e-6, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
OMEGAS = NAMED_OMEGAS + \
    [float(w) for w in torch.rand(52, generator=torch.Generator().manual_seed(5))]   # 64 values in (0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
def test_an_untrained_dpc_model_is_the_backbone_bitwise_at_every_omega_b(name):
    """At P' = P every prompt Eq. (5), (13) and inference build is P bit for bit, at each of 64 ω_b and ω_n.
    The logits are a function of those tensors alone (a deterministic forward on CPU): they are compared
    with the backbone's at the first pairs (the named ω_b), since at the 52 others they read P too."""
    learner = make_learner(name)
    torch.manual_seed(4)
    with torch.no_grad():   # a tuned P with generic values, not its initialisation
        for p in prompts.prompt_tensors(learner).values():
            p.add_(0.05 * torch.randn_like(p))
    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(learner).items()}
    parallel = train_dpc.initial_parallel_prompt(tuned)
    images = torch.randn(3, 3, 32, 32)
    backbone = logits(learner, images, {})
    for i, (omega_b, omega_n) in enumerate(zip(OMEGAS, reversed(OMEGAS))):
        for mode in ("parallel", "mixed"):
            prompt = base_class_prompt(parallel, tuned, omega_b, mode)
            assert all(torch.equal(prompt[k], tuned[k]) for k in tuned), (omega_b, mode)
        # the new side too (Eq. 13 at P' = P), at every ω_n
        new = new_class_prompt(parallel, tuned, omega_n)
        assert all(torch.equal(new[k], tuned[k]) for k in tuned), (omega_b, omega_n)
        for mode in ("parallel", "mixed"):
            pair = train_dpc.inference_prompts(parallel, tuned, omega_b, omega_n, mode)
            assert all(torch.equal(p[k], tuned[k]) for p in pair for k in tuned), (omega_b, omega_n)
        if i < len(NAMED_OMEGAS):
            assert torch.equal(logits(learner, images, base_class_prompt(parallel, tuned, omega_b, "mixed")), backbone)
            assert torch.equal(logits(learner, images, new), backbone)


@pytest.mark.parametrize("name", list(prompts.LEARNERS))
def test_an_inference_omega_b_never_changes_the_trained_parallel_prompt(name):
    """evaluate.py --omega-b / the ω_b sweep: the parallel base prompt and P̃_n are the trained ones bit for
    bit at every inference ω_b, and the mixed base prompt is Eq. (12) at the inference ω_b."""
    learner = make_learner(name)
    torch.manual_seed(6)
    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(learner).items()}
    parallel = {n: t + 0.05 * torch.randn_like(t) for n, t in tuned.items()}   # a trained P'
    new = new_class_prompt(parallel, tuned, 1e-6)
    for omega_b in OMEGAS:
        base_parallel, new_parallel = train_dpc.inference_prompts(parallel, tuned, omega_b, 1e-6, "parallel")
        base_mixed, new_mixed = train_dpc.inference_prompts(parallel, tuned, omega_b, 1e-6, "mixed")
        assert all(torch.equal(base_parallel[k], parallel[k]) for k in tuned), omega_b
        assert all(torch.equal(n[k], new[k]) for n in (new_parallel, new_mixed) for k in tuned), omega_b
        expected = train_dpc.weighting(parallel, tuned, omega_b)
        assert all(torch.equal(base_mixed[k], expected[k]) for k in tuned), omega_b


def small_synthetic(root):
    """The synthetic set with 4 train and 2 test images a class (not 20 and 4): enough for 2 shots, and a
    run's evaluation, which these tests do not look at, costs half. Its classes are the default's."""
    if not os.path.isdir(os.path.join(root, "synthetic")):
        toy_world.make_synthetic_imagefolder(str(root), "synthetic", n_train=4, n_val=0, n_test=2)


def synthetic_flags(tmp_path, shots):
    return ["--data", "synthetic", "--root", str(tmp_path / "data"), "--clip", "tiny", "--workers", "0", "--shots", str(shots)]


def train_teacher(tmp_path, shots):
    """PromptKD's teacher: a 1-epoch promptsrc run in ./teacher."""
    tb.main(tb.get_args(["--learner", "promptsrc", "--epochs", "1", "--batch-size", "8", "--output-dir", "teacher"]
                        + synthetic_flags(tmp_path, shots)))


def train_backbone_b(name, tmp_path, shots, teacher=True):
    """A 1-epoch backbone of `name` in ./b on synthetic data (PromptKD: with its teacher, trained first unless
    teacher is False: then ./teacher holds it already)."""
    common = synthetic_flags(tmp_path, shots)
    if name == "promptkd":
        if teacher:
            train_teacher(tmp_path, shots)
        common += ["--teacher", "teacher"]
    tb.main(tb.get_args(["--learner", name, "--epochs", "1", "--batch-size", "8", "--output-dir", "b"] + common))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
def test_train_dpc_starts_from_the_backbone_bitwise(name, tmp_path, monkeypatch):
    """train_dpc.main itself, every learner: with the optimiser's step switched off, P' stays P bit for
    bit and the DPC run's base and new accuracies are the backbone's, at ω_b = 1e-6 (the released step
    scales gradients by 1e6) and ω_n = 0.37 (P̃_n = P only because P' = P exactly), both base inferences."""
    monkeypatch.chdir(tmp_path)
    train_backbone_b(name, tmp_path, shots=4)
    backbone = json.loads((tmp_path / "b" / "results.json").read_text())
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    for mode in ("parallel", "mixed"):
        res = train_dpc.main(train_dpc.get_args(["--backbone", "b", "--omega-b", "1e-6", "--omega-n", "0.37",
                                                 "--base-inference", mode, "--epochs", "1", "--workers", "0",
                                                 "--shots", "4", "--output-dir", f"o_{mode}"]))
        ckpt = torch.load(tmp_path / f"o_{mode}" / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(ckpt["parallel_prompt"][k], ckpt["tuned_prompt"][k]) for k in ckpt["tuned_prompt"])
        assert res["base"] == backbone["base"] and res["new"] == backbone["new"], mode


# -- precision: both stages under autocast on CPU, so dtype mismatches show before a GPU sees them -----

class CountingScaler(torch.amp.GradScaler):
    calls = 0

    def scale(self, outputs):
        CountingScaler.calls += 1
        return super().scale(outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_stages_train_under_autocast(name, dtype, tmp_path, monkeypatch):
    """bf16 autocast as on an A100/H100, and fp16 with loss scaling as on a V100/T4: stage 1 and DPC both
    step through the scaler (DPC had none) and end with finite prompts."""
    monkeypatch.chdir(tmp_path)
    small_synthetic(tmp_path / "data")
    if name == "promptkd":   # its teacher is a PromptSRC run, trained in fp32: PromptSRC's own case covers it
        train_teacher(tmp_path, shots=2)
    monkeypatch.setattr(precision, "autocast", lambda device: torch.autocast("cpu", dtype=dtype))
    CountingScaler.calls = 0
    if dtype == torch.float16:
        monkeypatch.setattr(precision, "grad_scaler", lambda device: CountingScaler("cpu", init_scale=2.0 ** 8))
    train_backbone_b(name, tmp_path, shots=2, teacher=False)
    stage1_calls = CountingScaler.calls
    res = train_dpc.main(train_dpc.get_args(["--backbone", "b", "--epochs", "1", "--workers", "0", "--shots", "2",
                                             "--output-dir", "d"]))
    assert 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100
    ckpt = torch.load(os.path.join("d", "checkpoint.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["parallel_prompt"].values())
    if dtype == torch.float16:
        assert stage1_calls > 0 and CountingScaler.calls > stage1_calls


# -- the step on P' (docs/differences.md #6), checked against its formula, not against the code ------------

@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A 1-epoch backbone of every learner on synthetic data (PromptKD with a 1-epoch PromptSRC teacher)."""
    base = tmp_path_factory.mktemp("step")
    small_synthetic(base / "data")
    with contextlib.chdir(base):
        for name in prompts.LEARNERS:
            os.makedirs(name)
            with contextlib.chdir(name):
                train_backbone_b(name, base, shots=2)
    return base


class StepRecorder:
    """Around every training step of train_dpc.main: P' as the step's forward saw it (the values it substitutes
    into the learner with gradients on) and ∂L/∂P' at those values, taken from the step's own loss."""

    def __init__(self, monkeypatch):
        self.inside, self.seen, self.steps = False, [], []
        real_substitute, real_step = prompts.substitute, train_dpc.dpc_step

        @contextlib.contextmanager
        def substitute(learner, values):
            if self.inside and torch.is_grad_enabled():
                self.seen.append(values)
            with real_substitute(learner, values) as inner:
                yield inner

        def step(*args, **kwargs):
            self.inside, self.seen = True, []
            out = real_step(*args, **kwargs)
            self.inside = False
            values = self.seen[0]
            names = list(values)
            grads = torch.autograd.grad(out.loss, [values[n] for n in names], retain_graph=True, allow_unused=True)
            self.steps.append(({n: values[n].detach().clone() for n in names},
                               {n: torch.zeros_like(values[n]) if g is None else g.detach().clone()
                                for n, g in zip(names, grads)}))
            return out

        monkeypatch.setattr(prompts, "substitute", substitute)
        monkeypatch.setattr(train_dpc, "dpc_step", step)


def dassl_lr(epoch, base_lr, epochs):
    """The schedule as the spec states it: epoch 1 at 1e-5, then cosine over E epochs offset by one."""
    import math
    return 1e-5 if epoch == 1 else base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / epochs))


def expected_trajectory(steps, final, divided, omega_b, base_lr, epochs, scale_power=1):
    """SGD with momentum 0.9 and weight decay 5e-4, applied by hand to the recorded gradients:
    P' <- P' - lr·(g/ω_b^scale_power + wd·P') for the `divided` tensors (g for the others). Returns, per step, the
    P' the formula gives from the previous recorded P' (the last one compared with the final checkpoint)."""
    per_epoch = len(steps) // epochs
    assert per_epoch * epochs == len(steps) and per_epoch > 0
    buffers, out = {}, []
    for t, (p, g) in enumerate(steps):
        lr = dassl_lr(t // per_epoch + 1, base_lr, epochs)
        nxt = {}
        for n in p:
            d = g[n] / (omega_b ** scale_power if n in divided else 1.0) + 5e-4 * p[n]
            buffers[n] = d.clone() if t == 0 else 0.9 * buffers[n] + d
            nxt[n] = p[n] - lr * buffers[n]
        actual = steps[t + 1][0] if t + 1 < len(steps) else final
        out.append((nxt, actual))
    return out


RELEASED_DIVIDED = {"coop": None, "maple": None, "promptsrc": None, "promptkd": {"teacher.ctx"}}  # None: every tensor


@pytest.mark.slow
@pytest.mark.parametrize("name", list(prompts.LEARNERS))
@pytest.mark.parametrize("omega_b", [0.1, 0.2, 0.5, 1.0])
def test_each_step_moves_the_parallel_prompt_as_the_released_code(name, omega_b, backbones, tmp_path, monkeypatch):
    """P' <- P' - lr·(∂L/∂P'/ω_b + wd·P'), momentum 0.9, over a warm-up epoch and two cosine epochs: the
    released code's step (sple_coop.py; for PromptKD, sple_promptkd.py divides only its text context). P stays
    the backbone's bit for bit, and the first step's P' is P bit for bit (the untrained model is the backbone)."""
    monkeypatch.chdir(tmp_path)
    recorder = StepRecorder(monkeypatch)
    lr, epochs = 0.02, 3
    train_dpc.main(train_dpc.get_args(["--backbone", str(backbones / name / "b"), "--omega-b", str(omega_b),
                                       "--epochs", str(epochs), "--lr", str(lr), "--workers", "0", "--shots", "2",
                                       "--output-dir", "d"]))
    ckpt = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)
    backbone = checkpoints.read_checkpoint(str(backbones / name / "b" / "checkpoint.pt"))
    tuned = ckpt["tuned_prompt"]
    assert all(torch.equal(tuned[n], backbone["state"][n]) for n in tuned if n in backbone["state"])   # P unmoved
    first = recorder.steps[0][0]
    assert first.keys() == tuned.keys() and all(torch.equal(first[n], tuned[n]) for n in tuned)        # P' := P
    divided = RELEASED_DIVIDED[name] or set(tuned)
    for expected, actual in expected_trajectory(recorder.steps, ckpt["parallel_prompt"], divided, omega_b, lr, epochs):
        for n in tuned:
            torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
    if omega_b < 1:   # the test can tell the rules apart: the paper's plain lr, and the earlier lr/ω_b²
        moved = {n: ckpt["parallel_prompt"][n] - tuned[n] for n in divided}
        assert max(m.abs().max().item() for m in moved.values()) > 1e-4
        for power in (0, 2):
            other = expected_trajectory(recorder.steps, ckpt["parallel_prompt"], divided, omega_b, lr, epochs, power)
            assert any(not torch.allclose(a[n], e[n], rtol=1e-3, atol=1e-6) for e, a in other for n in divided)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coop", "promptkd"])
def test_the_paper_step_moves_the_parallel_prompt_at_lr(name, backbones, tmp_path, monkeypatch):
    """--parallel-step paper: P' imported to the optimizer, a plain SGD step at lr on every tensor."""
    monkeypatch.chdir(tmp_path)
    recorder = StepRecorder(monkeypatch)
    train_dpc.main(train_dpc.get_args(["--backbone", str(backbones / name / "b"), "--omega-b", "0.2", "--epochs", "2",
                                       "--lr", "0.02", "--parallel-step", "paper", "--workers", "0", "--shots", "2",
                                       "--output-dir", "d"]))
    ckpt = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)
    for expected, actual in expected_trajectory(recorder.steps, ckpt["parallel_prompt"], set(), 0.2, 0.02, 2):
        for n in expected:
            torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
