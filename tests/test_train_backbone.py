"""Tests for train_backbone.py: the Dassl lr schedule, a two-step smoke run of every learner on a
generated synthetic ImageFolder with the tiny random CLIP (open_clip-style `main([...])`), the run
folder and checkpoint, refusing to overwrite, bitwise-exact `--resume`, and the one-line errors of
`run()`. CPU only; everything is written under pytest's tmp folders.
"""
import json
import os
import re

import pytest
import torch

import backbones
import data
import prompts
import run_folder
import scoring
import toy_world
import train_backbone
from train_backbone import get_args, lr_at, main

LEARNERS = ["coop", "maple", "promptsrc", "promptkd"]
TEACHER = os.path.join("output", "synthetic", "promptsrc", "seed1")   # the promptsrc smoke run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    toy_world.make_synthetic_imagefolder(str(root), "synthetic")   # 10 classes: 5 base, 5 new
    return str(root)


def argv(learner, data_root, *extra):
    shots = "2" if learner == "promptkd" else "4"   # PromptKD trains on all 10 classes
    return ["--learner", learner, "--data", "synthetic", "--root", data_root, "--clip", "tiny",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--shots", shots, "--print-every", "1",
            *(["--teacher", TEACHER] if learner == "promptkd" else []), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """One finished smoke run per learner (promptkd distils the promptsrc run), all in one cwd."""
    cwd = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for learner in LEARNERS:
            results = main(get_args(argv(learner, data_root)))
            with open(backbones.LAST_BACKBONE) as f:
                last = f.read().strip()
            out[learner] = dict(results=results, dir=os.path.join("output", "synthetic", learner, "seed1"), last=last)
    out["cwd"] = cwd
    return out


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------

def test_lr_schedule_is_dassls_constant_warmup_then_offset_cosine():
    got = [float(f"{lr_at(e, 0.0035, 5):.4g}") for e in range(1, 6)]
    assert got == [1e-5, 0.0035, 0.003166, 0.002291, 0.001209]
    assert lr_at(1, 0.0025, 20) == 1e-5 and lr_at(2, 0.0025, 20) == 0.0025
    assert float(f"{lr_at(20, 0.0025, 20):.3g}") == 6.12e-5 and lr_at(20, 0.0025, 20) > 0   # never 0


# ------------------------------------------------------------------------------------------------
# Smoke runs: results, run folder, checkpoint, reloading
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("learner", LEARNERS)
def test_smoke_run_results_and_run_folder(learner, runs):
    run = runs[learner]
    results = run["results"]
    assert set(results) >= {"base", "new", "hm"}
    for key in ("base", "new", "hm"):
        assert 0.0 <= results[key] <= 100.0
    assert results["hm"] == pytest.approx(scoring.harmonic_mean(results["base"], results["new"]))
    run_dir = os.path.join(runs["cwd"], run["dir"])
    files = set(os.listdir(run_dir))
    assert files >= {"args.json", "checkpoint.pt", "log.txt", "results.json"}
    assert not [f for f in files if f.endswith(".tmp")]   # atomic writes leave no temp file behind
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    assert args["learner"] == learner and args["epochs"] == 1 and args["clip"] == "tiny"
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("base", "new", "hm")} == {k: results[k] for k in ("base", "new", "hm")}
    with open(os.path.join(run_dir, "log.txt")) as f:
        log = f.read()
    # Dassl's block, as parse_test_res.py reads it: one "* accuracy: X%" per split
    accuracies = [float(x) for x in re.findall(r"\* accuracy: ([\.\deE+-]+)%", log)]
    assert accuracies == pytest.approx([results["base"], results["new"]], abs=0.005)
    assert "epoch 1/1 it 2/2" in log            # two optimisation steps
    assert run["last"] == os.path.join(str(runs["cwd"]), run["dir"])   # last_backbone.txt -> this run


@pytest.mark.parametrize("learner", LEARNERS)
def test_checkpoint_is_small_and_holds_no_frozen_weights(learner, runs):
    path = os.path.join(runs["cwd"], runs[learner]["dir"], "checkpoint.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "backbone" and ckpt["finished"] and ckpt["learner"] == learner and ckpt["epoch"] == 1
    assert ckpt["state"] and not any(k.startswith(("clip.", "teacher.")) for k in ckpt["state"])
    if learner == "coop":
        assert set(ckpt["state"]) == {"ctx"}
        assert os.path.getsize(path) < 1_000_000
    assert os.path.getsize(path) < 4_000_000   # the tiny CLIP alone is ~40 MB


@pytest.mark.slow
@pytest.mark.parametrize("learner", LEARNERS)
def test_load_backbone_serves_the_new_classes(learner, runs, data_root, monkeypatch):
    monkeypatch.chdir(runs["cwd"])   # a PromptKD run names its teacher by the path it was given
    run_dir = os.path.join(runs["cwd"], runs[learner]["dir"])
    learner_, ckpt, clip = backbones.load_backbone(run_dir, "cpu")
    assert isinstance(learner_, prompts.LEARNERS[learner]) and not learner_.training
    splits = data.load_splits("synthetic", data_root, ckpt["args"]["shots"], 1)
    # the logged base/new accuracies are reproduced by the reloaded learner
    reproduced = scoring.base_to_new(learner_, splits, "cpu")
    assert {k: reproduced[k] for k in ("base", "new")} == {k: runs[learner]["results"][k] for k in ("base", "new")}
    # a learner built from scratch for the NEW classes takes the checkpoint and evaluates them
    new_test = splits["new"]["test"]
    new_classes = data.classnames_of(new_test)
    if learner != "promptkd":   # PromptKD distils on unlabeled images of all classes
        assert not set(new_classes) & set(ckpt["classnames"])
    a = ckpt["args"]
    fresh = prompts.build_learner(learner, clip, getattr(learner_, "teacher", None), a["n_ctx"], a["ctx_init"], a["kd_weight"])
    prompts.load_learner_state(fresh, ckpt["state"])
    fresh.eval()
    assert scoring.accuracy(fresh, new_test, new_classes, "cpu") == runs[learner]["results"]["new"]
    images = torch.stack([data.test_transform(32)(data.load_image(it.path)) for it in new_test[:4]])
    with torch.no_grad():
        assert fresh(images, new_classes).shape == (4, len(new_classes))


# ------------------------------------------------------------------------------------------------
# Run folders: no silent overwrite; --resume is exact
# ------------------------------------------------------------------------------------------------

def test_finished_run_is_not_overwritten(runs, data_root, monkeypatch):
    monkeypatch.chdir(runs["cwd"])
    run_dir = runs["coop"]["dir"]
    before = {f: open(os.path.join(run_dir, f), "rb").read() for f in ("checkpoint.pt", "args.json", "results.json")}
    with pytest.raises(run_folder.RunError, match="--overwrite"):
        main(get_args(argv("coop", data_root)))
    after = {f: open(os.path.join(run_dir, f), "rb").read() for f in before}
    assert after == before


@pytest.mark.slow
def test_resume_of_a_finished_run_does_not_train_again(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(get_args(argv("coop", data_root, "--output-dir", "done")))
    with open(os.path.join("done", "checkpoint.pt"), "rb") as f:
        before = f.read()
    try:
        main(get_args(argv("coop", data_root, "--output-dir", "done", "--resume")))
    except run_folder.RunError:
        pass   # refusing is fine; so is a no-op
    with open(os.path.join("done", "log.txt")) as f:
        assert f.read().count("epoch 1/1 it 1/2") == 1, "the finished run was trained again"
    with open(os.path.join("done", "checkpoint.pt"), "rb") as f:
        assert f.read() == before


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a run."""


def interrupt_epoch(monkeypatch, epoch, run_seed=1):
    """Make the train loader of `epoch` raise: epoch-1's checkpoint is written, epoch `epoch` never starts.
    (main seeds each epoch's loader with run_seed * 1000 + epoch; evaluation loaders do not shuffle.)"""
    real = data.make_loader

    def make_loader(dataset, batch_size, shuffle, workers, seed=0, **kwargs):
        if shuffle and seed == run_seed * 1000 + epoch:
            raise Interrupted(f"epoch {epoch}")
        return real(dataset, batch_size, shuffle, workers, seed=seed, **kwargs)

    monkeypatch.setattr(data, "make_loader", make_loader)


def interrupt_final_eval(monkeypatch):
    """Raise in the final evaluation: every epoch's checkpoint is written, the run is not finished."""
    def base_to_new(*args, **kwargs):
        raise Interrupted("final evaluation")
    monkeypatch.setattr(scoring, "base_to_new", base_to_new)


def read(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(run_dir, "results.json")) as f:
        return ckpt, json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("learner,where", [
    ("coop", "epoch 2"),
    ("promptsrc", "epoch 2"),   # carries the Gaussian prompt aggregation sum across the restart
    ("promptsrc", "final eval"),  # resumed between the last checkpoint and the GPA + evaluation
])
def test_resume_replays_an_interrupted_run_exactly(learner, where, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = argv(learner, data_root, "--epochs", "2", "--shots", "2")
    straight = main(get_args(common + ["--output-dir", "straight"]))

    with monkeypatch.context() as m:
        if where == "epoch 2":
            interrupt_epoch(m, 2)
        else:
            interrupt_final_eval(m)
        with pytest.raises(Interrupted):
            main(get_args(common + ["--output-dir", "resumed"]))
    ckpt = torch.load(os.path.join("resumed", "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert not ckpt["finished"] and ckpt["epoch"] == (1 if where == "epoch 2" else 2)
    with pytest.raises(run_folder.RunError, match="--resume"):
        main(get_args(common + ["--output-dir", "resumed"]))   # an unfinished run is not restarted silently

    resumed = main(get_args(common + ["--output-dir", "resumed", "--resume"]))
    assert resumed == straight
    (ckpt_a, res_a), (ckpt_b, res_b) = read("straight"), read("resumed")
    assert res_a == res_b
    assert ckpt_b["finished"] and ckpt_b["epoch"] == 2
    assert set(ckpt_a["state"]) == set(ckpt_b["state"])
    for k in ckpt_a["state"]:
        assert torch.equal(ckpt_a["state"][k], ckpt_b["state"][k]), k
    for a, b in zip(ckpt_a["optimizer"]["state"].values(), ckpt_b["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    with open(os.path.join("resumed", "log.txt")) as f:
        assert "resuming after epoch" in f.read()


# ------------------------------------------------------------------------------------------------
# run(): every expected failure is one line on stderr and exit code 2
# ------------------------------------------------------------------------------------------------

def expect_exit_2(argv_, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_backbone.run(argv_)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_unknown_learner_is_an_argparse_error(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = expect_exit_2(["--learner", "cocoop", "--data", "synthetic", "--root", data_root], capsys)
    assert "invalid choice: 'cocoop'" in err and "coop" in err


BAD_RUNS = {  # case -> (flags added to a valid coop run, what its error line must name)
    "missing dataset": (["--data", "no_such_set"], "no_such_set"),
    "epochs 0": (["--epochs", "0"], "--epochs must be positive"),
    "promptkd without teacher": (["--learner", "promptkd"], "--teacher"),
    "teacher is a coop run": (["--learner", "promptkd", "--teacher", "{coop_run}"], "coop run"),
    "truncated checkpoint": (["--output-dir", "{truncated}", "--resume"], "truncated"),
    "gpa std 0": (["--learner", "promptsrc", "--gpa-std", "0"], "--gpa-std must be positive"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_runs_end_in_one_error_line(case, runs, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    coop_run = os.path.join(str(runs["cwd"]), runs["coop"]["dir"])
    truncated = str(tmp_path / "truncated")
    os.makedirs(truncated)
    with open(os.path.join(coop_run, "checkpoint.pt"), "rb") as f:
        blob = f.read()
    with open(os.path.join(truncated, "checkpoint.pt"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    extra, needle = BAD_RUNS[case]
    extra = [a.format(coop_run=coop_run, truncated=truncated) for a in extra]
    valid = ["--learner", "coop", "--data", "synthetic", "--root", data_root, "--clip", "tiny", "--epochs", "1",
             "--batch-size", "8", "--workers", "0", "--shots", "2"]
    err = expect_exit_2(valid + extra, capsys)   # a repeated flag: argparse keeps the last
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_select_best_on_base_test_keeps_the_best_epoch(data_root, tmp_path, monkeypatch):
    """PromptKD's original model selection (docs/differences.md #4): the reported model is the best epoch's."""
    monkeypatch.chdir(tmp_path)
    res = main(get_args(argv("coop", data_root, "--epochs", "3", "--select-best-on-base-test", "--lr", "0.5")))
    log = open(os.path.join("output", "synthetic", "coop", "seed1", "log.txt")).read()
    per_epoch = [float(line.split("accuracy ")[1].split(" ")[0]) for line in log.splitlines()
                 if "base test accuracy" in line]
    assert len(per_epoch) == 3 and res["base"] == max(per_epoch)


@pytest.mark.slow
def test_the_finished_promptsrc_run_holds_the_gpa_of_its_epochs(data_root, tmp_path, monkeypatch):
    """PromptSRC's Gaussian prompt aggregation: the finished checkpoint (the P of DPC) holds Σ_e w_e · prompt_e over
    the end-of-epoch prompts each epoch's checkpoint saved, with gpa_weights' w_e, not the last epoch's prompts."""
    monkeypatch.chdir(tmp_path)
    saved, real_save = [], run_folder.save_atomic

    def save_and_keep(obj, path):   # every checkpoint as written: the epochs' ones are overwritten in the folder
        real_save(obj, path)
        saved.append(torch.load(path, weights_only=True))
    monkeypatch.setattr(run_folder, "save_atomic", save_and_keep)
    main(get_args(argv("promptsrc", data_root, "--epochs", "3", "--gpa-mean", "2", "--gpa-std", "1", "--lr", "0.5")))
    *epochs, finished = saved
    assert [c["epoch"] for c in epochs] == [1, 2, 3] and finished["finished"] and not epochs[-1]["finished"]
    w = prompts.gpa_weights(3, 2, 1)
    assert min(w) > 0.2   # every epoch counts
    for name, total in finished["gpa_sum"].items():
        gpa = sum(w[e] * epochs[e]["state"][name].float() for e in range(3))
        assert torch.allclose(total, gpa, rtol=1e-6, atol=1e-7), name
        assert torch.allclose(finished["state"][name].float(), gpa, rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(finished["state"][name].float(), epochs[-1]["state"][name].float()), name
