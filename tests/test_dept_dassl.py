"""DePT folders of the original code (Koorye/DePT: CoOp + DePT in PromptLearner/, MaPLe + DePT in
MultiModalPromptLearner/, written as Dassl writes them: the whole model in fp16 with FiLM in fp32, a
pickled SGD and warm-up/cosine scheduler) import without running code to a prompts.DePT learner with the
original's logits: fused on the head's classes, CLIP's alone on others. Dassl records no class names, so
they are given, and a head that does not fit them is one error line, as is DPC on a DePT folder.
tools/import_dassl.py turns such a folder into a run that evaluate.py reads as "+ DePT".
"""
import json
import os
import sys

import pytest
import torch

import backbones
import checkpoints
import dassl_import
import data
import evaluate
import prompts
import run_folder
import scoring
import toy_world
import train_dpc
from clip_model import random_clip
from dassl_files import write_dassl_folder
from test_checkpoints import Payload, dassl_folder, one_error_line, refused

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import import_dassl  # noqa: E402

BASE = ["red square", "blue circle", "green star", "pink heart"]
NEW = ["lime ring", "teal cross", "brown moon"]
# What an fp16 run of the original code keeps in fp32: FiLM's γ, β and MaPLe's deep prompts and their maps.
FP32_IN_THE_ORIGINAL = ("film_image.", "film_text.", "learner.compound_prompts_text.",
                        "learner.compound_prompt_projections.")


def trained_dept(name, classnames, seed=3):
    """A DePT learner far from its start (prompt, γ, β, W, b all random) with DePT's prompt (CoOp: 16
    random tokens), its fp16 tensors rounded to fp16 values as the original stores them: the import
    must then give back exactly this learner."""
    torch.manual_seed(seed)
    recipe = prompts.DePT.RECIPE[name]
    d = prompts.build_learner(name, random_clip("tiny", 0), n_ctx=recipe["n_ctx"], ctx_init=recipe["ctx_init"],
                              dept_classes=classnames)
    with torch.no_grad():
        for p in prompts.trainable_parameters(d.learner).values():
            p.add_(0.05 * torch.randn_like(p))
        for film in (d.film_image, d.film_text):
            film.scale.copy_(1 + 0.5 * torch.randn_like(film.scale))
            film.bias.copy_(0.1 * torch.randn_like(film.bias))
        d.linear_head.weight.normal_(0, 0.5)
        d.linear_head.bias.normal_(0, 0.5)
        state = prompts.learner_state(d)
        prompts.load_learner_state(d, {k: v if k.startswith(FP32_IN_THE_ORIGINAL) else v.half().float()
                                       for k, v in state.items()})
    return d.eval()


def images(n=5, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A generated 10-class ImageFolder (5 base, 5 new) and its 16-shot splits of seed 1."""
    root = str(tmp_path_factory.mktemp("data"))
    toy_world.make_synthetic_imagefolder(root, "synthetic")
    splits = data.load_splits("synthetic", root, 16, 1)
    return dict(root=root, splits=splits, base=data.classnames_of(splits["base"]["train"]))


def tool_flags(dassl, root, out):
    return [dassl, "--data", "synthetic", "--root", root, "--clip", "tiny", "--seed", "1", "--workers", "0",
            "--output-dir", out]


# ------------------------------------------------------------------------------------------------
# The file and the learner it imports to
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["coop", "maple"])
def test_a_dassl_dept_folder_imports_to_the_learner_it_was_written_from(tmp_path, name):
    original = trained_dept(name, BASE)
    path = write_dassl_folder(str(tmp_path / "run"), name, original, epoch=10)
    # as the original writes it: the whole model, fp16 but FiLM, and a scheduler object weights_only refuses
    assert "torch.optim.lr_scheduler.CosineAnnealingLR" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    state = dassl_import.read_dassl_checkpoint(path)
    assert state["prompt_learner.ctx"].dtype == state["linear_probe_proj.weight"].dtype == torch.float16
    assert state["film_lp_img.scale"].dtype == torch.float32 and "image_encoder.conv1.weight" in state
    assert os.path.basename(os.path.dirname(path)) == {"coop": "PromptLearner", "maple": "MultiModalPromptLearner"}[name]

    loaded, found = backbones.dassl_learner(str(tmp_path / "run"), "tiny", "cpu", classnames=BASE)
    assert found == name and isinstance(loaded, prompts.DePT) and loaded.classnames == BASE
    if name == "coop":   # DePT's CoOp: 16 random context tokens behind the prompt "X X .. X"
        assert loaded.learner.ctx.shape[0] == 16 and loaded.learner.prefix == " ".join(["X"] * 16)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x, BASE), original(x, BASE))       # fused with the head
        assert torch.equal(loaded(x, NEW), original(x, NEW))         # CLIP's logits alone
        assert torch.equal(loaded(x, NEW), loaded.learner(x, NEW))
        assert not torch.allclose(loaded(x, BASE), loaded.learner(x, BASE))   # the head counts on base classes


def test_a_payload_in_a_dassl_dept_folder_never_runs(tmp_path, synthetic, capsys):
    marker = tmp_path / "marker"
    write_dassl_folder(str(tmp_path / "evil"), "coop", trained_dept("coop", synthetic["base"]), epoch=10,
                       payload=Payload(marker))
    refused(capsys, import_dassl.run, tool_flags(str(tmp_path / "evil"), synthetic["root"], str(tmp_path / "out")),
            tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_head_needs_its_class_names_and_as_many_as_its_rows(tmp_path, synthetic, capsys):
    run = str(tmp_path / "run")
    write_dassl_folder(run, "maple", trained_dept("maple", BASE), epoch=10)
    with pytest.raises(dassl_import.HeadClassesUnknown, match="the 4 classes of its head must be given") as e:
        backbones.dassl_learner(run, "tiny", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(run_folder.RunError, match="has 4 rows, but 3 class names were given"):
        backbones.dassl_learner(run, "tiny", "cpu", classnames=BASE[:3])
    # the tool names the data's 5 base classes
    err = one_error_line(capsys, import_dassl.run, tool_flags(run, synthetic["root"], str(tmp_path / "out")), tmp_path)
    assert "has 4 rows, but 5 class names were given" in err
    assert not (tmp_path / "out").exists()


def test_dpc_refuses_a_dassl_dept_folder_in_one_line(tmp_path, synthetic, capsys):
    """Fig. 5 sets DPC beside DePT: a DePT folder is refused before its head is built, --data or not."""
    run = str(tmp_path / "run")
    write_dassl_folder(run, "coop", trained_dept("coop", synthetic["base"]), epoch=10)
    for given in (["--data", "synthetic", "--root", synthetic["root"]], []):
        err = one_error_line(capsys, train_dpc.run, ["--backbone", run, "--clip", "tiny", "--workers", "0",
                                                     "--output-dir", str(tmp_path / "dpc")] + given, tmp_path)
        assert "is a DePT run (the original code's ExtrasLinearProbe trainer)" in err, err
    assert not (tmp_path / "dpc").exists()


def test_the_import_tool_refuses_a_promptkd_student(tmp_path, synthetic, capsys):
    student = dassl_folder(tmp_path, "promptkd")
    err = one_error_line(capsys, import_dassl.run, tool_flags(student, synthetic["root"], str(tmp_path / "out")),
                         tmp_path)
    assert "is a PromptKD student" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# tools/import_dassl.py -> a run folder evaluate.py reads
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,dept", [("coop", True), ("maple", True), ("coop", False)],
                         ids=["coop+dept", "maple+dept", "coop"])
def test_an_imported_run_is_evaluated_as_its_original(tmp_path, synthetic, capsys, name, dept):
    if dept:
        original = trained_dept(name, synthetic["base"])
    else:   # a plain CoOp folder (prompt_learner/: ctx alone), "a photo of a" as the original's default
        torch.manual_seed(3)
        original = prompts.build_learner(name, random_clip("tiny", 0)).eval()
        with torch.no_grad():
            original.ctx.copy_((original.ctx + 0.05 * torch.randn_like(original.ctx)).half().float())
    dassl, out = str(tmp_path / "dassl"), str(tmp_path / "out")
    write_dassl_folder(dassl, name, original, epoch=10)
    flags = tool_flags(dassl, synthetic["root"], out)
    results = import_dassl.main(import_dassl.get_args(flags))
    expected = scoring.base_to_new(original, synthetic["splits"], "cpu", cache="off")
    assert results == expected

    ckpt = checkpoints.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(out, "checkpoint.pt")) == []
    assert (ckpt["kind"], ckpt["learner"], ckpt["clip"], ckpt["data"], ckpt["finished"], ckpt["epoch"]) == \
        ("backbone", name, "tiny", "synthetic", True, 10)
    assert ckpt["classnames"] == synthetic["base"]
    a = ckpt["args"]
    assert (a["dept"], a["dept_weight"], a["seed"], a["shots"], a["subsample"], a["imported_from"]) == \
        (dept, 0.7, 1, 16, "base", os.path.abspath(dassl))
    assert (a["n_ctx"], a["ctx_init"]) == {"coop": (16, "") if dept else (None, None), "maple": (2, None)}[name]
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["imported_from"] == os.path.abspath(dassl)
    with open(os.path.join(out, "results.json")) as f:
        stored = json.load(f)
    assert stored["kind"] == ("dept" if dept else "backbone") and stored["base"] == expected["base"]

    row_name = f"{scoring.NAMES[name]}{' + DePT' if dept else ''} synthetic seed 1"
    for recompute in ([], ["--recompute"]):
        capsys.readouterr()
        table = evaluate.main(evaluate.get_args([out, "--workers", "0", "--out", str(tmp_path / "ev")] + recompute))
        (row,) = table["runs"]
        assert row["kind"] == ("dept" if dept else "backbone")
        assert row["source"] == ("recomputed" if recompute else "results.json")
        assert (row["base"], row["new"]) == (expected["base"], expected["new"])
        assert row_name in capsys.readouterr().out
    # a finished run is never written over without --overwrite
    err = one_error_line(capsys, import_dassl.run, flags, tmp_path)
    assert "already holds a finished run" in err
