"""Checkpoints of other people: hostile files never run code, and the original code's stage-1 folders
(CoOp, MaPLe, PromptSRC, PromptKD students and teachers, written the way Dassl writes them) import
to the very learner they were written from."""
import contextlib
import os
import shutil

import pytest
import torch

import clip_model
import evaluate
import prompts
import train_backbone as tb
import train_dpc
from dassl_files import write_dassl_folder


class Payload:
    """Unpickles as os.system('touch <marker>'): if loading ran code, the marker file appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def common(root):
    return ["--data", "synthetic", "--root", root, "--clip", "tiny", "--workers", "0", "--shots", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data, a finished CoOp backbone, a promptsrc teacher and a CoOp DPC run (1 epoch each)."""
    base = tmp_path_factory.mktemp("checkpoints")
    root = str(base / "data")
    with contextlib.chdir(base):
        tb.main(tb.get_args(common(root) + ["--learner", "coop", "--epochs", "1", "--output-dir", "coop"]))
        tb.main(tb.get_args(common(root) + ["--learner", "promptsrc", "--epochs", "1", "--output-dir", "teacher"]))
        train_dpc.main(train_dpc.get_args(["--backbone", "coop", "--epochs", "1", "--workers", "0", "--shots", "2",
                                           "--output-dir", "dpc"]))
    return dict(base=base, root=root, coop=str(base / "coop"), teacher=str(base / "teacher"), dpc=str(base / "dpc"))


def hostile_copy(run: str, dst, marker, **changes) -> str:
    """A copy of a run folder whose checkpoint also pickles a Payload (and `changes`)."""
    shutil.copytree(run, dst)
    path = os.path.join(dst, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    torch.save(dict(ckpt, note=Payload(marker), **changes), path)
    return str(dst)


def refused(capsys, run, argv, cwd) -> str:
    """run(argv) stops with exit code 2 and ONE stderr line that names the offending global."""
    with contextlib.chdir(cwd):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: refusing to load"), err
    assert "posix.system" in err[0] and "--trust-checkpoint" in err[0], err[0]
    return err[0]


def dassl_folder(tmp_path, name, marker=None) -> str:
    """A Dassl stage-1 folder of `name`; with a marker, its state dict also pickles a Payload."""
    clip = clip_model.random_clip("tiny", 0)
    teacher = prompts.PromptSRC(clip_model.random_clip("tiny", 0)) if name == "promptkd" else None
    torch.manual_seed(0)
    learner = prompts.build_learner(name, clip, teacher, n_ctx=2 if name == "maple" else None)
    run = tmp_path / f"dassl_{name}"
    write_dassl_folder(str(run), name, learner, payload=Payload(marker) if marker else None)
    return str(run)


# -- every place a checkpoint is read ---------------------------------------------------------------

@pytest.mark.parametrize("place", ["dpc --backbone", "evaluate", "evaluate a DPC run's backbone",
                                   "train_backbone --resume", "train_dpc --resume", "promptkd --teacher"])
def test_a_payload_in_our_checkpoints_never_runs(world, tmp_path, capsys, place):
    marker = tmp_path / "marker"
    out = ["--output-dir", str(tmp_path / "out")]
    if place == "dpc --backbone":
        evil = hostile_copy(world["coop"], tmp_path / "evil", marker)
        refused(capsys, train_dpc.run, ["--backbone", evil, "--workers", "0", "--shots", "2"] + out, tmp_path)
    elif place == "evaluate":
        evil = hostile_copy(world["coop"], tmp_path / "evil", marker)
        refused(capsys, evaluate.run, [evil, "--workers", "0", "--out", str(tmp_path / "ev")], tmp_path)
    elif place == "evaluate a DPC run's backbone":
        evil = hostile_copy(world["coop"], tmp_path / "evil", marker)
        dpc = str(tmp_path / "dpc")
        shutil.copytree(world["dpc"], dpc)
        ckpt = torch.load(os.path.join(dpc, "checkpoint.pt"), weights_only=True)
        torch.save(dict(ckpt, backbone=evil), os.path.join(dpc, "checkpoint.pt"))
        os.remove(os.path.join(dpc, "results.json"))   # so that evaluate must load the backbone
        refused(capsys, evaluate.run, [dpc, "--workers", "0", "--out", str(tmp_path / "ev")], tmp_path)
    elif place == "train_backbone --resume":
        evil = hostile_copy(world["coop"], tmp_path / "evil", marker, finished=False)
        refused(capsys, tb.run, common(world["root"]) + ["--learner", "coop", "--epochs", "1", "--resume",
                                                         "--output-dir", evil], tmp_path)
    elif place == "train_dpc --resume":
        evil = hostile_copy(world["dpc"], tmp_path / "evil", marker, finished=False)
        refused(capsys, train_dpc.run, ["--backbone", world["coop"], "--workers", "0", "--shots", "2", "--resume",
                                        "--output-dir", evil], tmp_path)
    else:
        evil = hostile_copy(world["teacher"], tmp_path / "evil", marker)
        refused(capsys, tb.run, common(world["root"]) + ["--learner", "promptkd", "--epochs", "1", "--teacher", evil]
                + out, tmp_path)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["coop", "maple", "promptsrc", "promptkd"])
def test_a_payload_in_a_dassl_folder_never_runs(world, tmp_path, capsys, name):
    marker = tmp_path / "marker"
    evil = dassl_folder(tmp_path, name, marker)
    teacher = ["--teacher", world["teacher"], "--teacher-clip", "tiny"] if name == "promptkd" else []
    refused(capsys, train_dpc.run, ["--backbone", evil, "--data", "synthetic", "--root", world["root"], "--clip",
                                    "tiny", "--workers", "0", "--output-dir", str(tmp_path / "out")] + teacher, tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("reader", ["train_backbone --teacher", "train_dpc --teacher"])
def test_a_payload_in_a_dassl_teacher_folder_never_runs(world, tmp_path, capsys, reader):
    """PromptKD's released teachers, teacher_model/<Dataset>/VLPromptLearner/model-best.pth.tar."""
    marker = tmp_path / "marker"
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher_model" / "Synthetic"
    write_dassl_folder(str(teacher_dir), "promptsrc", prompts.PromptSRC(clip_model.random_clip("tiny", 0)), best=True,
                       payload=Payload(marker))
    out = ["--output-dir", str(tmp_path / "out")]
    if reader == "train_backbone --teacher":
        refused(capsys, tb.run, common(world["root"]) + ["--learner", "promptkd", "--teacher", str(teacher_dir),
                                                         "--teacher-clip", "tiny"] + out, tmp_path)
    else:  # a Dassl PromptKD student (harmless) with the hostile teacher
        student = dassl_folder(tmp_path, "promptkd")
        refused(capsys, train_dpc.run, ["--backbone", student, "--data", "synthetic", "--root", world["root"],
                                        "--clip", "tiny", "--teacher", str(teacher_dir), "--teacher-clip", "tiny",
                                        "--workers", "0"] + out, tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trust_checkpoint_is_the_only_way_past(world, tmp_path, capsys):
    """The flag really unpickles (the payload runs): which shows the refusals above are the loader's."""
    marker = tmp_path / "marker"
    evil = hostile_copy(world["coop"], tmp_path / "evil", marker)
    with contextlib.chdir(tmp_path):
        evaluate.main(evaluate.get_args([evil, "--workers", "0", "--out", "ev", "--trust-checkpoint"]))
    assert marker.exists()


def test_a_legacy_format_payload_is_refused_too(world, tmp_path, capsys):
    """Files in torch's pre-1.6 format cannot be scanned; weights_only=True still refuses the global."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil"
    shutil.copytree(world["coop"], evil)
    ckpt = torch.load(evil / "checkpoint.pt", weights_only=True)
    torch.save(dict(ckpt, note=Payload(marker)), evil / "checkpoint.pt", _use_new_zipfile_serialization=False)
    refused(capsys, train_dpc.run, ["--backbone", str(evil), "--workers", "0", "--shots", "2",
                                    "--output-dir", str(tmp_path / "out")], tmp_path)
    assert not marker.exists()


def test_our_checkpoints_hold_plain_data_only(world):
    """What we write loads with torch.load(weights_only=True) and nothing else allowed."""
    for run in ("coop", "teacher", "dpc"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(world[run], "checkpoint.pt")) == []
        torch.load(os.path.join(world[run], "checkpoint.pt"), weights_only=True)


# -- the original code's folders import exactly ------------------------------------------------------

def fp16_exact(learner):
    """Round the learner's own tensors to fp16 values (the original code stores fp16), so that the
    import must reproduce them exactly; the frozen CLIP stays as `--clip tiny` loads it."""
    with torch.no_grad():
        state = prompts.learner_state(learner)
        prompts.load_learner_state(learner, {k: v.half().to(v.dtype) if v.is_floating_point() else v
                                             for k, v in state.items()})
    return learner


def perturbed_learner(name, teacher=None):
    torch.manual_seed(3)
    learner = prompts.build_learner(name, clip_model.random_clip("tiny", 0), teacher,
                                    n_ctx=2 if name == "maple" else None)
    with torch.no_grad():
        for p in prompts.trainable_parameters(learner).values():
            p.add_(0.05 * torch.randn_like(p))
        if name == "promptkd":
            learner.projector[1].running_mean.normal_()
    return fp16_exact(learner).eval()


@pytest.mark.parametrize("name", ["coop", "maple", "promptsrc", "promptkd"])
def test_a_dassl_folder_imports_to_the_learner_it_was_written_from(tmp_path, name):
    """Whole-model state dict (MaPLe, PromptSRC, PromptKD) or prompt learner (CoOp), with the optimiser
    and the warm-up scheduler pickled as Dassl pickles them: loads without --trust-checkpoint, and the
    imported learner's logits equal the original's bit for bit."""
    teacher, teacher_dir = None, None
    if name == "promptkd":
        teacher = perturbed_learner("promptsrc")
        teacher_dir = str(tmp_path / "teacher_model" / "Synthetic")
        write_dassl_folder(teacher_dir, "promptsrc", teacher, best=True)
    learner = perturbed_learner(name, teacher)
    write_dassl_folder(str(tmp_path / "run"), name, learner, epoch=5)
    loaded, found = tb.dassl_learner(str(tmp_path / "run"), "tiny", "cpu", teacher_dir, "tiny")
    assert found == name
    if name == "promptkd":   # a Dassl student names no teacher: it must be given
        with pytest.raises(tb.RunError, match="--teacher"):
            tb.dassl_learner(str(tmp_path / "run"), "tiny", "cpu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = ["red stripes", "green stripes", "blue stripes"]
    with torch.no_grad():
        assert torch.equal(loaded(images, classes), learner(images, classes))


def test_dpc_runs_on_a_dassl_maple_folder(world, tmp_path):
    """The reported failure: train_dpc.py --backbone <Dassl MaPLe run> stopped with 'does not fit'."""
    write_dassl_folder(str(tmp_path / "maple"), "maple", perturbed_learner("maple"), epoch=5)
    with contextlib.chdir(tmp_path):
        res = train_dpc.main(train_dpc.get_args(["--backbone", str(tmp_path / "maple"), "--data", "synthetic",
                                                 "--root", world["root"], "--clip", "tiny", "--epochs", "1",
                                                 "--workers", "0", "--shots", "2", "--output-dir", "out"]))
    assert 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100


# -- PromptKD teachers ---------------------------------------------------------------------------------

def test_promptkd_accepts_a_released_dassl_teacher_folder(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    teacher_dir = tmp_path / "teacher_model" / "Synthetic"
    write_dassl_folder(str(teacher_dir), "promptsrc", perturbed_learner("promptsrc"), best=True)
    res = tb.main(tb.get_args(common(world["root"]) + ["--learner", "promptkd", "--epochs", "1", "--teacher",
                                                       str(teacher_dir), "--teacher-clip", "tiny",
                                                       "--output-dir", "kd"]))
    assert 0 <= res["base"] <= 100
    assert "warning" not in capsys.readouterr().out   # a released teacher is the original recipe
    # the student's run folder finds its Dassl teacher again (evaluate, DPC)
    learner, ckpt, _ = tb.load_backbone("kd", "cpu")
    assert ckpt["args"]["teacher_clip"] == "tiny" and isinstance(learner.teacher, prompts.PromptSRC)


def test_a_teacher_trained_off_recipe_gets_one_warning(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = dict(tb.PROMPTKD_TEACHER_RECIPE, clip="tiny", epochs=1, shots=2)   # the recipe, shortened
    monkeypatch.setattr(tb, "PROMPTKD_TEACHER_RECIPE", recipe)
    flags = ["--data", "synthetic", "--root", world["root"], "--workers", "0"]
    tb.main(tb.get_args(flags + ["--learner", "promptsrc", "--clip", "tiny", "--lr", str(recipe["lr"]), "--batch-size",
                                 str(recipe["batch_size"]), "--epochs", "1", "--shots", "2", "--output-dir", "good"]))
    tb.main(tb.get_args(flags + ["--learner", "promptsrc", "--clip", "tiny", "--epochs", "1", "--shots", "2",
                                 "--output-dir", "off"]))   # PromptSRC's ViT-B/16 defaults: lr 0.0025, batch 32
    capsys.readouterr()
    student = flags + ["--learner", "promptkd", "--clip", "tiny", "--epochs", "1", "--shots", "2"]
    tb.main(tb.get_args(student + ["--teacher", "good", "--output-dir", "kd_good"]))
    assert "warning" not in capsys.readouterr().out
    tb.main(tb.get_args(student + ["--teacher", "off", "--output-dir", "kd_off"]))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1
    assert "lr 0.0025 (original teacher: 0.005)" in warnings[0] and "batch_size 32 (original teacher: 8)" in warnings[0]
