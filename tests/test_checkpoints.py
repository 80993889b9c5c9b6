"""Checkpoints of other people: hostile files never run code, and the original code's stage-1 folders
(CoOp, MaPLe, PromptSRC, PromptKD students and teachers, written the way Dassl writes them) import
to the very learner they were written from."""
import contextlib
import os
import shutil

import pytest
import torch

import backbones
import checkpoints
import clip_model
import evaluate
import prompts
import run_folder
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


def one_error_line(capsys, run, argv, cwd) -> str:
    """run(argv) stops with exit code 2 and ONE `error:` line on stderr."""
    with contextlib.chdir(cwd):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def refused(capsys, run, argv, cwd) -> str:
    """One error line that refuses the file, naming the offending global."""
    err = one_error_line(capsys, run, argv, cwd)
    assert err.startswith("error: refusing to load") and "posix.system" in err and "--trust-checkpoint" in err, err
    return err


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

@pytest.mark.slow
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


# Plain-data checkpoints (nothing to refuse for the loader) whose fields are of the wrong kind: each
# must end in one `error:` line where it is read, not in a traceback further on.
def _args(ckpt, **changes):
    return dict(ckpt["args"], **changes)


DAMAGED_BACKBONES = {
    "state is a list": lambda c: dict(c, state=[]),
    "a state name that is not a string": lambda c: dict(c, state={0: c["state"]["ctx"]}),
    "learner is a list": lambda c: dict(c, learner=["coop"]),
    "clip is a number": lambda c: dict(c, clip=5),
    "data is a number": lambda c: dict(c, data=5),
    "classnames is a number": lambda c: dict(c, classnames=5),
    "args without seed": lambda c: dict(c, args={}),
    "root is a number": lambda c: dict(c, args=_args(c, root=5)),
    "seed is a string": lambda c: dict(c, args=_args(c, seed="x")),
    "finished is a tensor": lambda c: dict(c, finished=torch.tensor([1, 1])),
    "gpa_sum is a list": lambda c: dict(c, gpa_sum=[]),
    "best is a number": lambda c: dict(c, best=3),
    "ctx is complex": lambda c: dict(c, state={"ctx": c["state"]["ctx"].to(torch.complex64)}),
    "ctx is a meta tensor": lambda c: dict(c, state={"ctx": torch.empty(c["state"]["ctx"].shape, device="meta")}),
    "ctx is a stride-0 view beyond its storage": lambda c: dict(c, state={"ctx": torch.zeros(1).expand(2 ** 30)}),
}
DAMAGED_DPC_RUNS = {
    "tuned_prompt is a list": lambda c: dict(c, tuned_prompt=[]),
    "backbone is a number": lambda c: dict(c, backbone=5),
    "omega_b is a string": lambda c: dict(c, args=_args(c, omega_b="x")),
    "args without omega_b": lambda c: dict(c, args={k: v for k, v in c["args"].items() if k != "omega_b"}),
    "base_inference unknown": lambda c: dict(c, args=_args(c, base_inference="bogus")),
    "parallel prompt of another shape": lambda c: dict(c, parallel_prompt={"ctx": torch.zeros(3)}),
    "written by an earlier train_dpc.py (P̃_b)": lambda c: {**{k: v for k, v in c.items() if k != "parallel_prompt"},
                                                           "mixed_prompt": c["parallel_prompt"]},
}


def damaged_copy(run, dst, damage):
    run = shutil.copytree(run, dst)
    torch.save(damage(torch.load(run / "checkpoint.pt", weights_only=True)), run / "checkpoint.pt")
    return run


@pytest.mark.parametrize("damage", list(DAMAGED_BACKBONES))
def test_a_damaged_backbone_checkpoint_is_one_error_line(world, tmp_path, capsys, damage):
    run = damaged_copy(world["coop"], tmp_path / "run", DAMAGED_BACKBONES[damage])
    one_error_line(capsys, evaluate.run, [str(run), "--recompute", "--workers", "0", "--out", "ev"], tmp_path)
    one_error_line(capsys, train_dpc.run, ["--backbone", str(run), "--workers", "0", "--shots", "2",
                                           "--output-dir", "out"], tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGED_DPC_RUNS))
def test_a_damaged_dpc_checkpoint_is_one_error_line(world, tmp_path, capsys, damage):
    run = damaged_copy(world["dpc"], tmp_path / "run", DAMAGED_DPC_RUNS[damage])
    one_error_line(capsys, evaluate.run, [str(run), "--recompute", "--workers", "0", "--out", "ev"], tmp_path)
    one_error_line(capsys, train_dpc.run, ["--backbone", world["coop"], "--workers", "0", "--shots", "2", "--resume",
                                           "--output-dir", str(run)], tmp_path)


def test_resuming_a_dpc_run_whose_parallel_prompt_does_not_fit_is_one_error_line(world, tmp_path, capsys):
    run = damaged_copy(world["dpc"], tmp_path / "run",
                       lambda c: dict(c, finished=False, epoch=0, parallel_prompt={"ctx": torch.zeros(3)}))
    err = one_error_line(capsys, train_dpc.run, ["--backbone", world["coop"], "--workers", "0", "--shots", "2",
                                                 "--epochs", "1", "--resume", "--output-dir", str(run)], tmp_path)
    assert "the parallel prompt of" in err and "['ctx'] has shape (3,)" in err, err


def test_an_optimiser_state_that_does_not_fit_is_one_error_line(world, tmp_path, capsys):
    run = shutil.copytree(world["coop"], tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    bad = {"state": {0: {"momentum_buffer": torch.zeros(7)}}, "param_groups": ckpt["optimizer"]["param_groups"]}
    torch.save(dict(ckpt, finished=False, epoch=0, optimizer=bad), run / "checkpoint.pt")
    err = one_error_line(capsys, tb.run, common(world["root"]) + ["--learner", "coop", "--epochs", "1", "--resume",
                                                                  "--output-dir", str(run)], tmp_path)
    assert "the optimiser state in" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coop", "maple", "promptsrc", "promptkd"])
def test_a_payload_in_a_dassl_folder_never_runs(world, tmp_path, capsys, name):
    marker = tmp_path / "marker"
    evil = dassl_folder(tmp_path, name, marker)
    teacher = ["--teacher", world["teacher"], "--teacher-clip", "tiny"] if name == "promptkd" else []
    refused(capsys, train_dpc.run, ["--backbone", evil, "--data", "synthetic", "--root", world["root"], "--clip",
                                    "tiny", "--workers", "0", "--output-dir", str(tmp_path / "out")] + teacher, tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
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


def perturbed_learner(name, teacher=None, seed=3):
    torch.manual_seed(seed)
    learner = prompts.build_learner(name, clip_model.random_clip("tiny", 0), teacher,
                                    n_ctx=2 if name == "maple" else None)
    with torch.no_grad():
        for p in prompts.trainable_parameters(learner).values():
            p.add_(0.05 * torch.randn_like(p))
        if name == "promptkd":
            learner.projector[1].running_mean.normal_()
    return fp16_exact(learner).eval()


@pytest.mark.slow
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
    loaded, found = backbones.dassl_learner(str(tmp_path / "run"), "tiny", "cpu", teacher_dir, "tiny")
    assert found == name
    if name == "promptkd":   # a Dassl student names no teacher: it must be given
        with pytest.raises(run_folder.RunError, match="--teacher"):
            backbones.dassl_learner(str(tmp_path / "run"), "tiny", "cpu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = ["red stripes", "green stripes", "blue stripes"]
    with torch.no_grad():
        assert torch.equal(loaded(images, classes), learner(images, classes))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["promptsrc", "promptkd"])
def test_a_dassl_promptkd_student_is_read_from_its_best_checkpoint(tmp_path, name):
    """A VLPromptLearner folder with model.pth.tar-20 and model-best.pth.tar: the released DPC code takes a
    PromptKD student from model-best (PromptKD saves its best-val student); other learners, the newest -N."""
    teacher = perturbed_learner("promptsrc") if name == "promptkd" else None
    teacher_dir = None
    if teacher is not None:
        teacher_dir = str(tmp_path / "teacher_model" / "Synthetic")
        write_dassl_folder(teacher_dir, "promptsrc", teacher, best=True)
    last, best = perturbed_learner(name, teacher, seed=3), perturbed_learner(name, teacher, seed=4)
    write_dassl_folder(str(tmp_path / "run"), name, last, epoch=20)
    write_dassl_folder(str(tmp_path / "run"), name, best, best=True)
    loaded, _ = backbones.dassl_learner(str(tmp_path / "run"), "tiny", "cpu", teacher_dir, "tiny")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = ["red stripes", "green stripes", "blue stripes"]
    with torch.no_grad():
        expected = (best if name == "promptkd" else last)(images, classes)
        assert torch.equal(loaded(images, classes), expected)


@pytest.mark.slow
def test_dpc_runs_on_a_dassl_maple_folder(world, tmp_path):
    """The reported failure: train_dpc.py --backbone <Dassl MaPLe run> stopped with 'does not fit'."""
    write_dassl_folder(str(tmp_path / "maple"), "maple", perturbed_learner("maple"), epoch=5)
    with contextlib.chdir(tmp_path):
        res = train_dpc.main(train_dpc.get_args(["--backbone", str(tmp_path / "maple"), "--data", "synthetic",
                                                 "--root", world["root"], "--clip", "tiny", "--epochs", "1",
                                                 "--workers", "0", "--shots", "2", "--output-dir", "out"]))
    assert 0 <= res["base"] <= 100 and 0 <= res["new"] <= 100


@pytest.mark.slow
def test_a_dassl_folder_without_root_reads_the_data_folder_where_dpc_runs(world, tmp_path):
    """A Dassl folder records no dataset root: without --root, train_dpc.py reads ./data, as train_backbone.py
    does by default (it used to end in a TypeError traceback)."""
    write_dassl_folder(str(tmp_path / "maple"), "maple", perturbed_learner("maple"), epoch=5)
    with contextlib.chdir(world["base"]):   # the world's dataset root is <base>/data
        train_dpc.main(train_dpc.get_args(["--backbone", str(tmp_path / "maple"), "--data", "synthetic", "--clip", "tiny",
                                           "--epochs", "1", "--workers", "0", "--shots", "2",
                                           "--output-dir", str(tmp_path / "out")]))
    ckpt = checkpoints.read_checkpoint(str(tmp_path / "out" / "checkpoint.pt"))
    assert ckpt["finished"] and ckpt["args"]["root"] == os.path.abspath(world["root"])


@pytest.mark.slow
def test_a_dpc_run_on_a_dassl_promptkd_folder_given_relative_paths_evaluates_anywhere(world, tmp_path, capsys):
    """--teacher and a --clip weights file given relative to where train_dpc.py ran are recorded as
    absolute paths: evaluate.py --recompute from another folder finds them again."""
    work = tmp_path / "work"
    write_dassl_folder(str(work / "teacher_model" / "Synthetic"), "promptsrc", perturbed_learner("promptsrc"), best=True)
    write_dassl_folder(str(work / "student"), "promptkd", perturbed_learner("promptkd", perturbed_learner("promptsrc")),
                       epoch=5)
    torch.save(clip_model.random_clip("tiny", 0).state_dict(), work / "tiny.pt")
    with contextlib.chdir(work):
        trained = train_dpc.main(train_dpc.get_args(["--backbone", "student", "--teacher", "teacher_model/Synthetic",
                                                     "--clip", "tiny.pt", "--teacher-clip", "tiny.pt", "--data",
                                                     "synthetic", "--root", world["root"], "--epochs", "1",
                                                     "--workers", "0", "--shots", "2", "--output-dir", "dpc"]))
    os.makedirs(tmp_path / "elsewhere")
    with contextlib.chdir(tmp_path / "elsewhere"):
        table = evaluate.main(evaluate.get_args([str(work / "dpc"), "--recompute", "--workers", "0", "--out", "e"]))
    (row,) = table["runs"]
    assert (row["base"], row["new"]) == (trained["base"], trained["new"])


# -- PromptKD teachers ---------------------------------------------------------------------------------

@pytest.mark.slow
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
    learner, ckpt, _ = backbones.load_backbone("kd", "cpu")
    assert ckpt["args"]["teacher_clip"] == "tiny" and isinstance(learner.teacher, prompts.PromptSRC)


@pytest.mark.slow
def test_a_teacher_trained_off_recipe_gets_one_warning(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = dict(backbones.PROMPTKD_TEACHER_RECIPE, clip="tiny", epochs=1, shots=2)   # the recipe, shortened
    monkeypatch.setattr(backbones, "PROMPTKD_TEACHER_RECIPE", recipe)
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
