"""Smoke and parity tests for evaluate.py on real runs of both training scripts (coop backbone and
coop + DPC, seeds 1 and 2, tiny random CLIP, synthetic data, CPU): seed aggregation, recomputation
= results.json, ω_n = 0 = the backbone, the Fig. 6 sweep, cross-dataset targets, the Tab. 1 table and
the one-line errors. The tiny CLIP's accuracies mean nothing; only their bookkeeping is tested."""

import json
import os
import re
import shutil

import pytest
import torch

import backbones
import clip_model
import data
import evaluate
import run_folder
import scoring
import train_backbone as tb
import train_dpc as td


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"root", "runs", "coop/seed1", "coop_dpc/seed1", ...}: four finished runs made by the scripts'
    own entry points. chdir: train_backbone.py writes output/last_backbone.txt under the cwd."""
    base = tmp_path_factory.mktemp("evaluate")
    root, out = str(base / "data"), base / "runs"
    paths = {"root": root, "runs": str(out)}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        for seed in (1, 2):
            backbone, dpc = str(out / "coop" / f"seed{seed}"), str(out / "coop_dpc" / f"seed{seed}")
            tb.main(tb.get_args(["--learner", "coop", "--data", "synthetic", "--root", root, "--clip", "tiny",
                                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--shots", "4",
                                 "--seed", str(seed), "--output-dir", backbone]))
            td.main(td.get_args(["--backbone", backbone, "--epochs", "1", "--workers", "0", "--shots", "4",
                                 "--output-dir", dpc]))
            paths[f"coop/seed{seed}"], paths[f"coop_dpc/seed{seed}"] = backbone, dpc
    return paths


def results_json(run: str) -> dict:
    with open(os.path.join(run, "results.json")) as f:
        return json.load(f)


def evaluate_main(*argv) -> dict:
    return evaluate.main(evaluate.get_args([str(a) for a in argv]))


def run_exit_code(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        evaluate.run([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def copy_run(src: str, dst) -> str:
    os.makedirs(dst)
    for name in ("checkpoint.pt", "results.json"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


# ---------------------------------------------------------------------------------------------
# Aggregation and the Dassl block

@pytest.mark.slow
def test_aggregates_are_seed_means_and_hm_of_means(runs, tmp_path, capsys):
    out = evaluate_main(runs["runs"], "--out", tmp_path / "ev")
    stdout = capsys.readouterr().out
    assert len(out["runs"]) == 4 and {r["source"] for r in out["runs"]} == {"results.json"}
    for kind, folder in (("backbone", "coop"), ("dpc", "coop_dpc")):
        files = [results_json(runs[f"{folder}/seed{s}"]) for s in (1, 2)]
        base, new = sum(r["base"] for r in files) / 2, sum(r["new"] for r in files) / 2
        group = next(g for g in out["groups"] if g["kind"] == kind)
        assert (group["learner"], group["data"], sorted(group["seeds"])) == ("coop", "synthetic", [1, 2])
        assert group["base"] == pytest.approx(base) and group["new"] == pytest.approx(new)
        assert group["hm"] == pytest.approx(2 * base * new / (base + new))
        average = next(a for a in out["averages"] if a["kind"] == kind)
        assert (average["datasets"], average["base"], average["new"]) == (["synthetic"], group["base"], group["new"])
    # Dassl's block, as parse_test_res.py reads it: base and new per run
    assert len(re.findall(r"=> result", stdout)) == 8
    assert len(re.findall(r"\* accuracy: ([\.\deE+-]+)%", stdout)) == 8
    assert "+ DPC" in stdout and "Avg over" not in stdout and "paper" not in stdout  # one non-paper dataset
    written = json.load(open(tmp_path / "ev" / "results.json"))
    assert written["groups"] == out["groups"]
    assert "| + DPC |" in open(tmp_path / "ev" / "table.md").read()


def test_hm_is_taken_of_the_seed_means_not_averaged(runs, tmp_path):
    """Real checkpoints with hand-written (fabricated) results.json numbers, so the two conventions differ:
    HM of means = 2·60·35/95 = 44.2105; the mean of per-seed HMs would be 44.2045."""
    for seed, (base, new) in ((1, (70.0, 40.0)), (2, (50.0, 30.0))):
        run = copy_run(runs[f"coop/seed{seed}"], tmp_path / "runs" / f"seed{seed}")
        run_folder.write_json_atomic(dict(results_json(run), base=base, new=new), os.path.join(run, "results.json"))
    out = evaluate_main(tmp_path / "runs", "--out", tmp_path / "ev")
    (group,) = out["groups"]
    assert (group["base"], group["new"]) == (60.0, 35.0)
    assert group["hm"] == pytest.approx(2 * 60 * 35 / 95, abs=1e-9)
    assert [r["hm"] for r in out["runs"]] == pytest.approx([2 * 70 * 40 / 110, 2 * 50 * 30 / 80])


# ---------------------------------------------------------------------------------------------
# Recomputing from checkpoints, ω overrides, Fig. 6 sweep

@pytest.mark.slow
def test_recompute_equals_results_json(runs, tmp_path):
    out = evaluate_main(runs["runs"], "--recompute", "--out", tmp_path)
    assert {r["source"] for r in out["runs"]} == {"recomputed"}
    for row in out["runs"]:
        saved = results_json(row["run"])
        assert (row["base"], row["new"]) == (saved["base"], saved["new"]), row["run"]


@pytest.mark.slow
def test_omega_n_zero_gives_the_backbone_new_accuracy_exactly(runs, tmp_path):
    out = evaluate_main(runs["coop_dpc/seed1"], runs["coop_dpc/seed2"], "--omega-n", "0", "--out", tmp_path)
    for row in out["runs"]:
        assert row["source"] == "recomputed" and row["omega_n"] == 0.0
        backbone = results_json(torch.load(os.path.join(row["run"], "checkpoint.pt"), weights_only=True)["backbone"])
        assert row["new"] == backbone["new"]


@pytest.mark.slow
def test_sweep_omega_n_and_refusal_of_omega_b_zero(runs, tmp_path, capsys):
    out = evaluate_main(runs["runs"], "--sweep", "omega_n", "--values", "0,1e-6", "--out", tmp_path)
    assert out["values"] == [0.0, 1e-6] and out["split"] == "new" and len(out["runs"]) == 2  # DPC runs only
    for row in out["runs"]:
        assert row["accuracies"][0] == results_json(runs[f"coop/seed{row['seed']}"])["new"]  # ω_n = 0: P itself
        assert all(0.0 <= a <= 100.0 for a in row["accuracies"])
    assert json.load(open(tmp_path / "sweep.json"))["values"] == [0.0, 1e-6]
    capsys.readouterr()
    code, err = run_exit_code([runs["runs"], "--sweep", "omega_b", "--values", "0", "--out", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "(0, 1]" in err


# ---------------------------------------------------------------------------------------------
# Cross-dataset target (Tab. 2)

@pytest.mark.slow
def test_target_gives_an_accuracy(runs, tmp_path):
    out = evaluate_main(runs["coop/seed1"], "--target", "synthetic", "--target-root", runs["root"], "--out", tmp_path)
    (row,) = out["runs"]
    assert (row["source"], row["target"]) == ("synthetic", "synthetic") and 0.0 <= row["accuracy"] <= 100.0
    assert os.path.isfile(tmp_path / "transfer.json")


# ---------------------------------------------------------------------------------------------
# Tab. 1 table (fabricated rows: tests the formatting only) and the paper's numbers

def test_table_puts_the_paper_number_beside_ours():
    cells = [dict(learner="coop", kind="backbone", data="eurosat", seeds=[1], base=80.12, new=50.0, hm=60.8),
             dict(learner="coop", kind="backbone", data="synthetic", seeds=[1], base=70.0, new=40.0, hm=50.9),
             dict(learner="coop", kind="dpc", data="eurosat", seeds=[1], base=90.0, new=50.0, hm=64.3)]
    averages = [dict(learner="coop", kind="backbone", data="average", datasets=["eurosat", "synthetic"],
                     base=75.06, new=45.0, hm=56.27),
                dict(learner="coop", kind="dpc", data="average", datasets=["eurosat"], base=90.0, new=50.0, hm=64.3)]
    text = scoring.format_table(cells, averages)
    assert "80.12 (paper 87.60)" in text and "51.62" in text and "90.00 (paper 93.40)" in text
    assert "70.00 (paper –)" in text and "75.06 (paper –)" in text  # no paper number for synthetic
    assert "Avg over 2 datasets" in text and "average is over eurosat only" in text
    assert "+ DPC" in text and text.index("CoOp") < text.index("+ DPC")
    markdown = scoring.format_table(cells, averages, markdown=True)
    assert "| CoOp | 75.06 (paper –) |" in markdown and "EuroSAT Base" in markdown


def test_paper_numbers_are_consistent_with_tab1():
    """The stored averages are the means of the per-dataset numbers, and the computed H matches Tab. 1."""
    for (learner, row), table in scoring.PAPER.items():
        for i in range(2):
            per_dataset = sum(table[d][i] for d in scoring.PAPER_DATASETS) / 11
            assert per_dataset == pytest.approx(table["average"][i], abs=0.006), (learner, row, i)
    assert scoring.paper_cell("coop", "backbone", "eurosat")[2] == pytest.approx(64.96, abs=0.005)
    assert scoring.paper_cell("coop", "dpc", "average", scoring.PAPER_DATASETS)[2] == pytest.approx(76.13, abs=0.005)


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2

@pytest.mark.parametrize("case", ["no run", "corrupted", "unfinished"])
def test_bad_folders_fail_with_one_line(runs, tmp_path, capsys, case):
    folder = tmp_path / "folder"
    folder.mkdir()
    if case == "corrupted":
        (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    elif case == "unfinished":
        ckpt = torch.load(os.path.join(runs["coop/seed1"], "checkpoint.pt"), weights_only=True)
        torch.save(dict(ckpt, finished=False), folder / "checkpoint.pt")
    code, err = run_exit_code([folder, "--out", tmp_path / "ev"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")
    assert {"no run": "no run in", "corrupted": "corrupted", "unfinished": "unfinished"}[case] in err


# ---------------------------------------------------------------------------------------------
# Zero-shot CLIP with CoOp's per-dataset templates

@pytest.mark.slow
def test_zero_shot_uses_each_datasets_coop_template(runs, tmp_path, monkeypatch, capsys):
    """A run on 'dtd' (an ImageFolder tree under the DTD name) gets DTD's "{} texture.", one on other
    data "a photo of a {}."; the row's accuracy is that of zero-shot CLIP with its template, computed
    here from clip.encode_text of the formatted prompts."""
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "data")
    shutil.copytree(os.path.join(runs["root"], "synthetic"), os.path.join(root, "dtd"))
    tb.main(tb.get_args(["--learner", "coop", "--data", "dtd", "--root", root, "--clip", "tiny", "--epochs", "1",
                         "--batch-size", "8", "--workers", "0", "--shots", "4", "--output-dir", "dtd_run"]))
    out = evaluate_main("dtd_run", runs["coop/seed1"], "--zero-shot", "--workers", "0", "--out", "ev")
    rows = {r["data"]: r for r in out["runs"] if r["kind"] == "zeroshot"}
    assert rows["dtd"]["template"] == "{} texture." and rows["synthetic"]["template"] == "a photo of a {}."
    assert "note: Zero-shot CLIP on dtd uses the template '{} texture.'" in capsys.readouterr().out
    clip = backbones.load_clip("tiny", "cpu")
    splits = data.load_splits("dtd", root, 0, 1)
    items = splits["base"]["test"]
    names = [c.replace("_", " ") for c in data.classnames_of(items)]
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.encode_text(clip_model.tokenize([f"{n} texture." for n in names])), dim=-1)
        images = torch.stack([data.test_transform(32)(data.load_image(it.path)) for it in items])
        image = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
    right = int(((image @ text.t()).argmax(-1) == torch.tensor([it.label for it in items])).sum())
    expected = 100.0 * right / len(items)   # in float64: a float32 mean of 6/20 is 0.30000001
    assert abs(rows["dtd"]["base"] - expected) < 1e-6
