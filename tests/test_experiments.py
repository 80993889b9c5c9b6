"""The paper's remaining experiments end to end on generated data (tiny random CLIP, CPU): Tab. 2's
cross-dataset / cross-domain layout and Tab. 3's five ablation rows, one command each."""
import contextlib
import json
import os
import shutil

import pytest
import torch

import evaluate
import scoring
import toy_world
import train_backbone as tb
import train_dpc

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]


def cross_domain_tree(root, synthetic):
    """ImageNet-R in CoOp's layout: classnames.txt for 6 wnids, 3 of them as folders (+ README.txt),
    whose images are those of three synthetic classes."""
    folder = os.path.join(root, "imagenet-rendition")
    os.makedirs(os.path.join(folder, "imagenet-r"))
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.writelines(f"{w} thing {i}\n" for i, w in enumerate(WNIDS))
    open(os.path.join(folder, "imagenet-r", "README.txt"), "w").write("ignored\n")
    for i, wnid in enumerate(WNIDS[:3]):
        shutil.copytree(os.path.join(synthetic, "test", f"class_0{i}"), os.path.join(folder, "imagenet-r", wnid))


@pytest.fixture(scope="module")
def tab2(tmp_path_factory):
    """A source run on all classes of 'synthetic' and its DPC run, the targets: 'other' (an ImageFolder
    copy, standing in for a cross-dataset target) and imagenet_r (cross-domain)."""
    base = tmp_path_factory.mktemp("tab2")
    root = str(base / "data")
    with contextlib.chdir(base):
        common = ["--data", "synthetic", "--root", root, "--clip", "tiny", "--workers", "0", "--shots", "2"]
        tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "8", "--subsample", "all",
                             "--output-dir", "src"] + common))
        train_dpc.main(train_dpc.get_args(["--backbone", "src", "--epochs", "1", "--workers", "0", "--shots", "2",
                                           "--output-dir", "src_dpc"]))
    shutil.copytree(os.path.join(root, "synthetic"), os.path.join(root, "other"))
    cross_domain_tree(root, os.path.join(root, "synthetic"))
    return dict(base=base, root=root)


@pytest.mark.slow
def test_transfer_prints_tab2_and_keeps_every_target(tab2, capsys, monkeypatch):
    real, calls = scoring.encode_images, []
    monkeypatch.setattr(scoring, "encode_images", lambda *a: calls.append(1) or real(*a))
    scoring._MEMO.clear()
    with contextlib.chdir(tab2["base"]):
        out = evaluate.main(evaluate.get_args(["src", "src_dpc", "--target", "other,imagenet_r", "--workers", "0",
                                               "--out", "ev"]))
    assert len(calls) <= 3   # 2 CoOp runs x 3 test sets, each test set encoded once (the source's: in training)
    per_run = {(r["kind"], r["target"]): r["accuracy"] for r in out["runs"]}
    assert set(per_run) == {(k, t) for k in ("backbone", "dpc") for t in ("synthetic", "other", "imagenet_r")}
    for s in out["mean_over_seeds"]:
        assert s["source_accuracy"] == per_run[s["kind"], "synthetic"]
        assert s["cross_dataset"] == per_run[s["kind"], "other"] and s["cross_dataset_targets"] == ["other"]
        assert s["cross_domain"] == per_run[s["kind"], "imagenet_r"] and s["cross_domain_targets"] == ["imagenet_r"]
    printed = capsys.readouterr().out
    assert "Method" in printed and "Avg. of cross-dataset" in printed and "Avg. of cross-domain" in printed
    assert "[1 of 10]" in printed and "[1 of 4]" in printed
    saved = json.load(open(os.path.join(tab2["base"], "ev", "transfer.json")))
    assert saved["paper_tab2"]["coop/dpc"] == {"source": 71.80, "cross_dataset": 64.98, "cross_domain": 60.31}
    # the DPC run's new-class prompt is P at ω_n -> 0: the same target accuracy as the backbone here
    assert per_run["dpc", "imagenet_r"] == per_run["backbone", "imagenet_r"]


def test_target_groups_expand_to_the_papers_targets():
    assert evaluate.parse_targets("cross-domain", {"imagenet"}) == ["imagenet", "imagenet_v2", "imagenet_sketch",
                                                                    "imagenet_a", "imagenet_r"]
    assert evaluate.parse_targets("cross-dataset", {"imagenet"})[1:] == [d for d in scoring.PAPER_DATASETS][1:]


# -- Tab. 3 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tab3(tmp_path_factory):
    """The five commands of docs/ablation.md (1 epoch each) on a CoOp backbone."""
    base = tmp_path_factory.mktemp("tab3")
    root = str(base / "data")
    stage1 = ["--learner", "coop", "--data", "synthetic", "--root", root, "--clip", "tiny", "--workers", "0",
              "--shots", "4", "--batch-size", "8", "--epochs", "1"]
    dpc = ["--backbone", "coop", "--epochs", "1", "--workers", "0", "--shots", "4"]
    with contextlib.chdir(base):
        tb.main(tb.get_args(stage1 + ["--output-dir", "coop"]))
        tb.main(tb.get_args(stage1 + ["--continue-from", "coop", "--output-dir", "row1"]))
        train_dpc.main(train_dpc.get_args(dpc + ["--omega-b", "1", "--omega-n", "1", "--output-dir", "row2"]))
        train_dpc.main(train_dpc.get_args(dpc + ["--loss", "learner", "--base-inference", "mixed", "--omega-n", "0.2",
                                                 "--output-dir", "row3"]))
        train_dpc.main(train_dpc.get_args(dpc + ["--loss", "learner", "--base-inference", "mixed", "--output-dir", "row4"]))
        train_dpc.main(train_dpc.get_args(dpc + ["--output-dir", "row5"]))
    return base


def results(base, run):
    return json.load(open(os.path.join(base, run, "results.json")))


def ckpt(base, run):
    return torch.load(os.path.join(base, run, "checkpoint.pt"), weights_only=True)


@pytest.mark.slow
def test_tab3_rows_are_what_their_flags_say(tab3):
    backbone, row1 = ckpt(tab3, "coop"), ckpt(tab3, "row1")
    assert row1["args"]["continue_from"] == str(tab3 / "coop") and row1["epoch"] == 1
    assert not torch.equal(row1["state"]["ctx"], backbone["state"]["ctx"])    # tuned further from P
    # (2): one prompt for base and new, so base and new inference both use P'
    r2 = ckpt(tab3, "row2")
    parallel, tuned = r2["parallel_prompt"], r2["tuned_prompt"]
    assert all(torch.equal(b, n) for b, n in zip(train_dpc.base_class_prompt(parallel, tuned, 1.0, "parallel").values(),
                                                 train_dpc.new_class_prompt(parallel, tuned, 1.0).values()))
    # (3) and (4) train the same P' (same seed, same loss): only their inference differs
    r3, r4 = ckpt(tab3, "row3"), ckpt(tab3, "row4")
    assert all(torch.equal(r3["parallel_prompt"][k], r4["parallel_prompt"][k]) for k in r3["parallel_prompt"])
    assert not torch.equal(r3["parallel_prompt"]["ctx"], ckpt(tab3, "row5")["parallel_prompt"]["ctx"])   # another loss
    assert results(tab3, "row3")["base"] == results(tab3, "row4")["base"]      # both: the mixed prompt on base
    assert results(tab3, "row4")["new"] == results(tab3, "coop")["new"]        # (4) decouples: new is P's
    assert results(tab3, "row3")["loss"] == "learner" and results(tab3, "row5")["loss"] == "hard-negative"


def test_evaluate_lays_out_tab3(tab3, capsys):
    with contextlib.chdir(tab3):
        out = evaluate.main(evaluate.get_args(["coop", "row1", "row2", "row3", "row4", "row5", "--ablation",
                                               "--out", "ev"]))
    rows = {a["kind"]: a for a in out["averages"]}
    assert set(rows) == set(scoring.ABLATION_ROWS)
    for row, run in zip(scoring.ABLATION_ROWS, ("coop", "row1", "row2", "row3", "row4", "row5")):
        assert (rows[row]["base"], rows[row]["new"]) == (results(tab3, run)["base"], results(tab3, run)["new"]), row
    printed = capsys.readouterr().out
    assert "(1) TS" in printed and "(paper 82.69)" in printed and "(paper 85.15)" in printed
    line3 = next(line for line in printed.splitlines() if line.startswith("(3) TS + WE "))
    assert line3.count("(paper –)") == 2 and "(paper 65.88)" in line3
    assert os.path.isfile(tab3 / "ev" / "ablation.json")


@pytest.mark.slow
def test_continue_from_refuses_another_learner(tab3, capsys, tmp_path):
    with contextlib.chdir(tab3):
        with pytest.raises(SystemExit):
            tb.run(["--learner", "maple", "--data", "synthetic", "--root", str(tab3 / "data"), "--clip", "tiny",
                    "--workers", "0", "--continue-from", "coop", "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--continue-from" in err[0] and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_transfer_reads_each_runs_source_from_its_own_root(tab2, tmp_path, monkeypatch):
    """Two runs of a dataset named 'synthetic' from different --root folders (10 and 4 classes): each
    run's source column uses its own root's test split, not the one read first."""
    monkeypatch.chdir(tmp_path)
    other_root = str(tmp_path / "data4")
    toy_world.make_synthetic_imagefolder(other_root, "synthetic", n_classes=4, n_train=4, n_test=3, seed=5)
    tb.main(tb.get_args(["--learner", "coop", "--epochs", "1", "--batch-size", "8", "--subsample", "all",
                         "--data", "synthetic", "--root", other_root, "--clip", "tiny", "--workers", "0",
                         "--shots", "2", "--output-dir", "small"]))
    src = os.path.join(tab2["base"], "src")
    both = evaluate.main(evaluate.get_args([src, "small", "--target", "synthetic", "--workers", "0", "--out", "a"]))
    alone = evaluate.main(evaluate.get_args(["small", "--target", "synthetic", "--workers", "0", "--out", "b"]))
    small = [r for r in both["runs"] if r["run"] == os.path.abspath("small")]
    assert [r["accuracy"] for r in small] == [r["accuracy"] for r in alone["runs"]]
