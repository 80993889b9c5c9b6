"""Reliability: every bad input gives one line and exit code 2 and writes nothing; interrupted runs
resume to identical results; checkpoints are never lost. One test per row of README's table."""
import contextlib
import functools
import json
import os
import shutil
import signal

import pytest
import torch
from PIL import Image

import data
import evaluate
import forked
import prompts
import run_folder
import toy_world
import train_backbone as tb
import train_dpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic dataset, broken variants of it, and one finished CoOp backbone run."""
    base = tmp_path_factory.mktemp("reliability")
    root = str(base / "data")
    toy_world.make_synthetic_imagefolder(root, "synthetic")
    src = os.path.join(root, "synthetic")

    def variant(name, edit):
        shutil.copytree(src, os.path.join(root, name))
        edit(os.path.join(root, name))

    variant("one_class", lambda d: [shutil.rmtree(os.path.join(d, s, c)) for s in ("train", "val", "test")
                                    for c in os.listdir(os.path.join(d, s)) if c != "class_00"])
    variant("empty_class", lambda d: [os.remove(os.path.join(d, "train", "class_03", f))
                                      for f in os.listdir(os.path.join(d, "train", "class_03"))])
    variant("other_test", lambda d: shutil.rmtree(os.path.join(d, "test", "class_09")))
    variant("three_classes", lambda d: [shutil.rmtree(os.path.join(d, s, c)) for s in ("train", "val", "test")
                                        for c in os.listdir(os.path.join(d, s)) if c not in ("class_00", "class_01",
                                                                                             "class_02")])
    variant("bad_image", lambda d: open(os.path.join(d, "train", "class_02", "0.png"), "wb").write(b"not a png"))
    os.makedirs(os.path.join(root, "eurosat"))
    with open(os.path.join(root, "eurosat", "split_zhou_EuroSAT.json"), "w") as f:
        f.write("{ not json")
    os.makedirs(os.path.join(root, "dtd", "images"))
    with open(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json"), "w") as f:
        json.dump({"train": [["banded/missing.jpg", 0, "banded"]], "val": [], "test": []}, f)

    names = os.path.join(src, "classnames.txt")
    variant("long_name", lambda d: open(os.path.join(d, "classnames.txt"), "a").write(
        "class_03 " + "very " * 75 + "red stripes\n"))   # the last line for a folder wins
    variant("same_name", lambda d: open(os.path.join(d, "classnames.txt"), "w").write(
        open(names).read().replace("class_01 green stripes", "class_01 Red  Stripes")))
    pets = os.path.join(root, "oxford_pets")   # a split file whose label 1 is 'beagle' in train, 'boxer' in test
    os.makedirs(os.path.join(pets, "images"))
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(os.path.join(pets, "images", f"{i}.png"))
    with open(os.path.join(pets, "split_zhou_OxfordPets.json"), "w") as f:
        json.dump({"train": [["0.png", 0, "abyssinian"], ["1.png", 1, "beagle"]], "val": [],
                   "test": [["2.png", 0, "abyssinian"], ["3.png", 1, "boxer"]]}, f)

    with contextlib.chdir(base):
        tb.main(tb.get_args(common(root) + ["--learner", "coop", "--output-dir", "coop"]))
        train_dpc.main(train_dpc.get_args(["--backbone", "coop", "--epochs", "1", "--workers", "0", "--shots", "4",
                                           "--output-dir", "coop_dpc"]))
    return dict(base=base, root=root, coop=str(base / "coop"), dpc=str(base / "coop_dpc"))


def common(root, dataset="synthetic"):
    return ["--data", dataset, "--root", root, "--clip", "tiny", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--shots", "4"]


def fails(capsys, run, argv, fragment, cwd):
    """run(argv) exits 2 with exactly one stderr line, 'error: ...' containing `fragment`."""
    with contextlib.chdir(cwd):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert fragment in err[0], err[0]
    return err[0]


# -- the table: (what, script, flags, expected fragment) -----------------------------------------
ROOT, CKPT = "<root>", "<coop>"
CASES = [
    ("missing root", tb.run, ["--learner", "coop", "--data", "eurosat", "--root", "/no/such/root"], "not found"),
    ("unknown dataset", tb.run, ["--learner", "coop", "--data", "no_such_set", "--root", ROOT], "known datasets: imagenet"),
    ("unknown learner", tb.run, ["--learner", "cocoop", "--data", "synthetic", "--root", ROOT], "choose from 'coop'"),
    ("fewer than 2 classes", tb.run, ["--learner", "coop", "--data", "one_class", "--root", ROOT], "class"),
    ("empty class folder", tb.run, ["--learner", "coop", "--data", "empty_class", "--root", ROOT], "has no images"),
    ("train/test class sets differ", tb.run, ["--learner", "coop", "--data", "other_test", "--root", ROOT], "class"),
    ("split JSON does not parse", tb.run, ["--learner", "coop", "--data", "eurosat", "--root", ROOT], "split_zhou_EuroSAT.json"),
    ("split JSON points at missing files", tb.run, ["--learner", "coop", "--data", "dtd", "--root", ROOT], "missing.jpg"),
    ("unreadable image", tb.run, ["--learner", "coop", "--data", "bad_image", "--root", ROOT, "--shots", "0"], "0.png"),
    ("negative --shots", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--shots", "-1"], "--shots"),
    ("batch size 0", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--batch-size", "0"], "--batch-size must be positive"),
    ("epochs 0", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--epochs", "0"], "--epochs must be positive"),
    ("negative lr", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--lr", "-1"], "--lr must be positive"),
    ("--topk below 2", train_dpc.run, ["--backbone", CKPT, "--topk", "1"], "--topk must be at least 2"),
    ("omega_b outside (0, 1]", train_dpc.run, ["--backbone", CKPT, "--omega-b", "1.5"], "--omega-b must be in (0, 1]"),
    ("omega_n outside [0, 1]", train_dpc.run, ["--backbone", CKPT, "--omega-n", "-0.1"], "--omega-n must be in [0, 1]"),
    ("an empty --target", evaluate.run, [CKPT, "--target", " , ", "--out", "<out>"], "names no dataset"),
    ("an empty --values", evaluate.run, [CKPT, "--sweep", "omega_n", "--values", "", "--out", "<out>"], "--values must be comma-separated numbers"),
    ("--values without --sweep", evaluate.run, [CKPT, "--values", "0.1", "--out", "<out>"], "--values needs --sweep"),
    ("omega_b 0 in a sweep", evaluate.run, [CKPT, "--sweep", "omega_b", "--values", "0,0.2", "--out", "<out>"], "--omega-b must be in (0, 1]"),
    ("DPC with negative --shots", train_dpc.run, ["--backbone", CKPT, "--shots", "-1"], "--shots"),
    ("a dataset of 3 classes (a new half of one class)", tb.run, ["--learner", "coop", "--data", "three_classes", "--root", ROOT], "base-to-new needs at least 4"),
    ("infinite lr", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--lr", "inf"], "--lr must be positive and finite"),
    ("an lr beyond fp32", train_dpc.run, ["--backbone", CKPT, "--lr", "1e300"], "--lr must be positive and finite (in fp32)"),
    ("negative --workers", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--workers", "-1"], "--workers must be 0"),
    ("DPC with negative --workers", train_dpc.run, ["--backbone", CKPT, "--workers", "-1"], "--workers must be 0"),
    ("evaluate with negative --workers", evaluate.run, [CKPT, "--recompute", "--workers", "-1", "--out", "<out>"], "--workers must be 0"),
    ("--print-every 0", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--print-every", "0"], "--print-every must be at least 1"),
    ("a seed beyond 64 bits", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--seed", str(10 ** 20)], "--seed must fit in 64 bits"),
    ("a device this machine lacks", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--device", "cuda:7"], "is not available here"),
    ("an unknown device", train_dpc.run, ["--backbone", CKPT, "--device", "foo"], "--device foo is not available here"),
    ("an empty --feature-cache", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--feature-cache", ""], "--feature-cache '' names no folder"),
    ("negative --n-ctx", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--n-ctx", "-1", "--ctx-init", ""], "--n-ctx must be at least 1"),
    ("--gpa-std 0", tb.run, ["--learner", "promptsrc", "--data", "synthetic", "--root", ROOT, "--gpa-std", "0"], "--gpa-std must be positive"),
    ("negative --kd-weight", tb.run, ["--learner", "promptkd", "--data", "synthetic", "--root", ROOT, "--kd-weight", "-5"], "--kd-weight must be positive"),
    ("PromptKD at batch size 1", tb.run, ["--learner", "promptkd", "--data", "synthetic", "--root", ROOT, "--batch-size", "1"], "BatchNorm"),
    ("DPC --output-dir is its --backbone", train_dpc.run, ["--backbone", CKPT, "--output-dir", CKPT, "--overwrite"], "is the --backbone run itself"),
    ("--output-dir is the --continue-from run", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--continue-from", CKPT, "--output-dir", CKPT, "--overwrite"], "is the --continue-from run itself"),
    ("missing CLIP weights", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--clip", "/no/ViT-B-16.pt"], "not found"),
    ("ResNet checkpoint", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--clip", "<resnet>"], "only ViT backbones"),
    ("resume with another learner", tb.run, ["--learner", "maple", "--data", "synthetic", "--root", ROOT, "--output-dir", "<unfinished>", "--resume"], "was started with other flags: --learner 'coop' -> 'maple'"),
    ("resume with another CLIP", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--clip", "<vit>", "--output-dir", "<unfinished>", "--resume"], "was started with other flags: --clip 'tiny' -> "),
    ("DPC on another dataset", train_dpc.run, ["--backbone", CKPT, "--data", "other_test"], "was trained on synthetic"),
    ("DPC on another class set", train_dpc.run, ["--backbone", CKPT, "--root", "<renamed>"], "trained on other classes"),
    ("corrupted checkpoint", train_dpc.run, ["--backbone", "<truncated>"], "corrupted or truncated"),
    ("--backbone without a run", train_dpc.run, ["--backbone", "<empty>"], "no finished backbone run"),
    ("finished run in --output-dir", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--output-dir", CKPT], "already holds a finished run"),
    ("evaluate a folder without runs", evaluate.run, ["<empty>"], "no run in"),
    ("class name beyond CLIP's 77 tokens", tb.run, ["--learner", "coop", "--data", "long_name", "--root", ROOT], "more than CLIP's 77"),
    ("two classes CLIP reads the same", tb.run, ["--learner", "coop", "--data", "same_name", "--root", ROOT], "can never be told apart"),
    ("a label with two class names", tb.run, ["--learner", "coop", "--data", "oxford_pets", "--root", ROOT], "'beagle' (train) and 'boxer' (test)"),
    ("checkpoint that is not a dict", train_dpc.run, ["--backbone", "<list>"], "was not written by train_backbone.py"),
    ("checkpoint without a run's keys", train_dpc.run, ["--backbone", "<nokeys>"], "incomplete or damaged backbone checkpoint"),
    ("evaluate a checkpoint that is not a dict", evaluate.run, ["<list>", "--out", "<out>"], "was not written by"),
    ("resume a checkpoint without a run's keys", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--output-dir", "<nokeys>", "--resume"], "incomplete"),
    ("a DPC run as --backbone", train_dpc.run, ["--backbone", "<dpc>"], "holds a DPC run (train_dpc.py), not a stage-1 run"),
    ("a backbone run as DPC --output-dir", train_dpc.run, ["--backbone", CKPT, "--output-dir", "<unfinished>", "--resume"], "holds a backbone run"),
    ("NaN prompts as --backbone", train_dpc.run, ["--backbone", "<nan>"], "NaN/inf"),
    ("evaluate NaN prompts", evaluate.run, ["<nan>", "--out", "<out>"], "NaN/inf"),
    ("output folder not writable", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--output-dir", "<file>/run"], "cannot create the run folder"),
    ("output folder cannot be created (was '0 MB free')", tb.run, ["--learner", "coop", "--data", "synthetic", "--root", ROOT, "--output-dir", "/proc/dpc_run"], "cannot create the run folder /proc/dpc_run"),
]


def prepare(world, tmp_path):
    """Paths the table refers to."""
    resnet = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}, resnet)
    vit = tmp_path / "vit.pt"   # a ViT of another width than 'tiny'
    torch.save(torch.load(os.path.join(REPO, "tests", "fixtures", "clip_reference.pt"))["state_dict"], vit)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    ckpt = torch.load(os.path.join(world["coop"], "checkpoint.pt"), weights_only=True)
    torch.save(dict(ckpt, finished=False), unfinished / "checkpoint.pt")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "checkpoint.pt").write_bytes(open(os.path.join(world["coop"], "checkpoint.pt"), "rb").read()[:300])
    renamed = tmp_path / "renamed"
    shutil.copytree(os.path.join(world["root"], "synthetic"), renamed / "synthetic")
    (renamed / "synthetic" / "classnames.txt").write_text(
        "\n".join(f"class_{i:02d} thing {i}" for i in range(10)) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    odd = {}
    for name, content in (("list", [1, 2]), ("nokeys", {"kind": "backbone", "learner": "coop"}),
                          ("nan", dict(ckpt, state={"ctx": ckpt["state"]["ctx"] * float("nan")}))):
        (tmp_path / name).mkdir()
        torch.save(content, tmp_path / name / "checkpoint.pt")
        odd[f"<{name}>"] = str(tmp_path / name)
    return {ROOT: world["root"], CKPT: world["coop"], "<resnet>": str(resnet), "<vit>": str(vit),
            "<unfinished>": str(unfinished), "<truncated>": str(truncated), "<renamed>": str(renamed),
            "<empty>": str(tmp_path / "empty"), "<file>": str(tmp_path / "file"), "<out>": str(tmp_path / "out"),
            "<dpc>": world["dpc"], **odd}


@pytest.mark.slow
@pytest.mark.parametrize("what, run, flags, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(world, tmp_path, capsys, what, run, flags, fragment):
    paths = prepare(world, tmp_path)
    argv = [functools.reduce(lambda text, kv: text.replace(*kv), paths.items(), a) for a in flags]
    defaults = {"--workers": "0", "--shots": "4", "--output-dir": str(tmp_path / "out")}
    if run is tb.run:
        defaults.update({"--clip": "tiny", "--epochs": "1"})
    if run is not evaluate.run:
        argv += [x for k, v in defaults.items() if k not in argv for x in (k, v)]
    before = {f: open(os.path.join(world["coop"], f), "rb").read() for f in ("checkpoint.pt", "results.json")}
    fails(capsys, run, argv, fragment, tmp_path)
    assert not (tmp_path / "out").exists(), "a failed start wrote a run folder"
    assert before == {f: open(os.path.join(world["coop"], f), "rb").read() for f in before}


def test_a_dpc_run_as_backbone_is_not_sent_to_resume(world, tmp_path, capsys):
    """The message names the DPC run's own backbone and does not suggest `train_backbone.py --resume`."""
    err = fails(capsys, train_dpc.run, ["--backbone", world["dpc"], "--workers", "0", "--shots", "4",
                                        "--output-dir", str(tmp_path / "out")], "pass its backbone", tmp_path)
    assert "--resume" not in err and world["coop"] in err


@pytest.mark.slow
def test_large_and_odd_images_are_converted(tmp_path):
    """Grayscale/RGBA/palette/CMYK/16-bit are covered in test_data.py; here a 50-megapixel image."""
    path = tmp_path / "big.png"
    Image.new("RGB", (10000, 5000), (200, 30, 30)).save(path, compress_level=1)
    x = data.ImageDataset([data.Item(str(path), 0, "big")], data.test_transform(32))[0][0]
    assert x.shape == (3, 32, 32)


@pytest.mark.slow
def test_shots_above_class_size_warns_once(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tb.main(tb.get_args(common(world["root"]) + ["--learner", "coop", "--shots", "30"]))
    out = capsys.readouterr().out
    assert out.count("warning: --shots 30, but 10 classes have fewer train images (fewest: 20") == 1


@pytest.mark.slow
def test_topk_above_base_classes_is_clamped_with_one_warning(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train_dpc.main(train_dpc.get_args(["--backbone", world["coop"], "--topk", "9", "--epochs", "1",
                                       "--workers", "0", "--shots", "4"]))
    assert capsys.readouterr().out.count("warning: --topk 9 > 5 base classes; using K = 5") == 1


# -- faults ----------------------------------------------------------------------------------------

def test_failed_write_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(world["coop"], run_dir)
    good = (run_dir / "checkpoint.pt").read_bytes()

    def broken_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        run_folder.save_atomic({"x": 1}, str(run_dir / "checkpoint.pt"))
    assert (run_dir / "checkpoint.pt").read_bytes() == good

    def full_disk(obj, path):   # what torch's own zip writer raises: a RuntimeError, which run_cli would not catch
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="file write failed"):   # one line through run_cli, like any OSError
        run_folder.save_atomic({"x": 1}, str(run_dir / "checkpoint.pt"))
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(world["coop"]))   # no temp file left


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = prompts.CoOp.training_loss
    calls = {"n": 0}

    def nan_in_epoch_2(self, images, labels, classnames):
        out = real(self, images, labels, classnames)
        calls["n"] += 1
        return dict(out, loss=out["loss"] * float("nan")) if calls["n"] == 3 else out   # epoch 2, iteration 1

    monkeypatch.setattr(prompts.CoOp, "training_loss", nan_in_epoch_2)
    err = fails(capsys, tb.run, common(world["root"]) + ["--learner", "coop", "--epochs", "2", "--output-dir", "nan"],
                "loss is nan at epoch 2 iteration 1", tmp_path)
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["finished"] and "epoch 1" in err


@pytest.mark.slow
def test_nan_loss_in_the_first_epoch_promises_no_checkpoint(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prompts.CoOp, "training_loss", lambda self, images, labels, classnames:
                        dict(loss=torch.tensor(float("inf"), requires_grad=True)))
    err = fails(capsys, tb.run, common(world["root"]) + ["--learner", "coop", "--output-dir", "inf"],
                "loss is inf at epoch 1 iteration 1", tmp_path)
    assert "no checkpoint was written" in err and "epoch 0" not in err
    assert not (tmp_path / "inf" / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["backbone", "dpc"])
def test_a_run_that_diverges_on_its_last_step_is_never_saved_as_finished(world, tmp_path, monkeypatch, capsys, stage):
    """Every loss finite, the very last SGD step makes the prompt NaN (as --lr 1e30 can): the epoch is not
    saved, the run does not end as 'finished' with chance accuracy, and the message keeps the promise."""
    real_step = torch.optim.SGD.step
    steps = {"n": 0}

    def last_step_diverges(self, closure=None):
        real_step(self, closure)
        steps["n"] += 1
        if steps["n"] == steps["last"]:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    epochs = ["--epochs", "2"]
    if stage == "backbone":
        argv, run = common(world["root"]) + ["--learner", "coop", "--output-dir", "diverged"] + epochs, tb.run
    else:
        argv, run = ["--backbone", world["coop"], "--workers", "0", "--shots", "4", "--output-dir", "diverged"] + epochs, \
            train_dpc.run
    with contextlib.chdir(tmp_path):   # count the steps of a clean run first
        monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: (real_step(self, closure),
                                                                                 steps.__setitem__("n", steps["n"] + 1)))
        run(argv[:argv.index("--output-dir")] + ["--output-dir", "clean"] + epochs)
    steps["last"], steps["n"] = steps["n"], 0
    monkeypatch.setattr(torch.optim.SGD, "step", last_step_diverges)
    err = fails(capsys, run, argv, "holds NaN/inf after epoch 2 (the run diverged)", tmp_path)
    assert "the last good checkpoint (epoch 1) is kept" in err
    ckpt = torch.load(tmp_path / "diverged" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["finished"] and not (tmp_path / "diverged" / "results.json").exists()


def test_not_enough_disk_space_is_refused_before_training(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    fails(capsys, tb.run, common(world["root"]) + ["--learner", "coop", "--output-dir", "full"], "MB free", tmp_path)
    assert not (tmp_path / "full" / "checkpoint.pt").exists()


def interrupted_flags(world):
    return common(world["root"]) + ["--learner", "coop", "--epochs", "3", "--print-every", "1", "--shots", "8"]


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """The uninterrupted run the interrupted ones are compared with: the same command, run once."""
    cwd = tmp_path_factory.mktemp("straight")
    assert forked.run(cwd, "train_backbone.py", *interrupted_flags(world), "--output-dir", "straight").returncode == 0
    return cwd / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_to_identical_results(world, straight, tmp_path, how):
    """Kill a run (a process of its own: tests/forked.py) in the middle of epoch 2 (Ctrl-C, SIGTERM or
    kill -9), resume it, compare bit for bit."""
    flags = interrupted_flags(world)
    proc = forked.start(tmp_path, "train_backbone.py", *flags, "--output-dir", "cut")
    for line in proc.stdout:  # the progress lines: stop it after the first iteration of epoch 2
        if line.startswith("epoch 2/3 it 1/"):
            proc.send_signal(getattr(signal, how))
            break
    _, err = proc.communicate(timeout=60)
    if how != "SIGKILL":   # Ctrl-C and SIGTERM (kill, a container stop, Slurm) end alike: one line, 128 + signal
        assert proc.returncode == 128 + getattr(signal, how) and \
            err.strip().splitlines()[-1].startswith(f"interrupted ({how}):")
    else:
        assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    resumed = forked.run(tmp_path, "train_backbone.py", *flags, "--output-dir", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    uncut = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(uncut["state"][k], resumed["state"][k]) for k in uncut["state"])
    assert json.loads((straight / "results.json").read_text()) == \
        json.loads((tmp_path / "cut" / "results.json").read_text())


def crashing_loader(real, epoch: int):
    """data.make_loader that stops the run like Ctrl-C when asked for epoch `epoch`'s shuffled loader (the
    stages seed each epoch's loader with seed * 1000 + epoch)."""
    def make_loader(dataset, batch_size, shuffle, workers, seed=0, **kwargs):
        if shuffle and seed % 1000 == epoch:
            raise KeyboardInterrupt
        return real(dataset, batch_size, shuffle, workers, seed=seed, **kwargs)
    return make_loader


@pytest.mark.slow
def test_interrupted_dpc_run_resumes_to_identical_results(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--backbone", world["coop"], "--epochs", "2", "--workers", "0", "--shots", "4"]
    straight = train_dpc.main(train_dpc.get_args(flags + ["--output-dir", "straight"]))
    real = data.make_loader
    monkeypatch.setattr(data, "make_loader", crashing_loader(real, 2))
    with pytest.raises(SystemExit) as exit_:
        train_dpc.run(flags + ["--output-dir", "cut"])
    assert exit_.value.code == 130
    monkeypatch.setattr(data, "make_loader", real)
    resumed = train_dpc.main(train_dpc.get_args(flags + ["--output-dir", "cut", "--resume"]))
    assert resumed == straight
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["parallel_prompt"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["parallel_prompt"]
    assert all(torch.equal(a[k], b[k]) for k in a)
