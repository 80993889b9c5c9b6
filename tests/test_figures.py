"""evaluate.py --figures on real runs of both training scripts (coop backbone and coop + DPC, seeds 1 and 2,
tiny random CLIP, synthetic data, CPU): Fig. 1 and the Tab. 1 figure in the default mode, Fig. 6 with
--sweep, each a PNG of the chosen size and a PDF beside a JSON that holds exactly evaluate.py's numbers;
with coop + DePT runs beside them (train_backbone.py --dept), Fig. 5 as a table (fig5.md, results.json)
and a figure, and DePT's bars in Fig. 1; nothing drawn without the flag; matplotlib never imported by the
stages. The tiny CLIP's accuracies mean nothing; only that the figures carry them is tested."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import evaluate
import figures
import scoring
import test_evaluate
import train_backbone as tb

runs = test_evaluate.runs   # the fixture of test_evaluate.py, made again for this module: coop and coop + DPC, seeds 1, 2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAB1_FILES = ["fig1_base.png", "fig1_base.pdf", "fig1_base.json",
              "tab1_base_new_h.png", "tab1_base_new_h.pdf", "tab1_base_new_h.json"]
FIG5_FILES = ["fig5_hm.png", "fig5_hm.pdf", "fig5_hm.json"]


def evaluate_main(*argv) -> dict:
    return evaluate.main(evaluate.get_args([str(a) for a in argv]))


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def written_figures(stdout: str) -> list[str]:
    return sorted(line[len("wrote figure "):] for line in stdout.splitlines() if line.startswith("wrote figure "))


def check_drawn(stem, pixels: tuple[int, int]) -> dict:
    """The PNG opens, has `pixels` (figure inches × FIGURE_DPI) and is not a blank page; the PDF is one.
    Returns the JSON of the numbers drawn."""
    with Image.open(f"{stem}.png") as image:
        image.load()
        assert image.format == "PNG" and image.size == pixels
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50   # bars, text, lines: far more than a few flat colours
    with open(f"{stem}.pdf", "rb") as f:
        assert f.read(5) == b"%PDF-"
    return read_json(f"{stem}.json")


def by_method(items: list[dict]) -> dict:
    return {(i["learner"], i["kind"]): i for i in items}


# ---------------------------------------------------------------------------------------------
# Tab. 1 mode: Fig. 1 and the Base/New/H figure

@pytest.mark.slow
def test_tab1_figures_hold_evaluates_numbers(runs, tmp_path, capsys):
    out = evaluate_main(runs["runs"], "--figures", "--out", tmp_path)
    assert written_figures(capsys.readouterr().out) == sorted(str(tmp_path / name) for name in TAB1_FILES)
    source = f"4 runs under {figures.shown_path(runs['runs'])}, seeds 1, 2."

    fig1 = check_drawn(tmp_path / "fig1_base", (960, 630))      # FIGURE_SIZE 6.4 x 4.2 in at 150 dpi
    averages = by_method(out["averages"])
    assert set(by_method(fig1["bars"])) == set(averages) == {("coop", "backbone"), ("coop", "dpc")}
    for key, bar in by_method(fig1["bars"]).items():
        assert (bar["base"], bar["datasets"]) == (averages[key]["base"], averages[key]["datasets"]) == (bar["base"], ["synthetic"])
        assert bar["paper_base"] is None                          # synthetic is not a paper dataset
    assert fig1["zero_shot"] == [] and "no paper numbers apply: synthetic" in fig1["paper_note"]
    assert fig1["caption"].startswith("From " + source)

    tab1 = check_drawn(tmp_path / "tab1_base_new_h", (960, 600))  # one panel: 6.4 x (2.8 + 1.2) in
    (panel,) = tab1["panels"]                                     # one dataset: its panel is the average
    groups = by_method(out["groups"])
    assert panel["data"] == "synthetic" and set(by_method(panel["bars"])) == set(groups)
    for key, bar in by_method(panel["bars"]).items():
        assert [bar[m] for m in ("base", "new", "hm")] == [groups[key][m] for m in ("base", "new", "hm")]
        assert bar["paper"] is None
    assert tab1["caption"].startswith("From " + source)
    assert read_json(tmp_path / "results.json")["groups"] == out["groups"]   # the numbers of the JSON beside it


def fabricated(table) -> tuple[list[dict], list[dict]]:
    """scoring.aggregate's cells and averages for made-up (learner, kind, {dataset: (base, new)}) rows."""
    cells, averages = [], []
    for learner, kind, numbers in table:
        for name, (base, new) in numbers.items():
            cells.append(dict(learner=learner, kind=kind, data=name, seeds=[1], base=base, new=new,
                              hm=scoring.harmonic_mean(base, new)))
        base, new = (scoring.mean([v[i] for v in numbers.values()]) for i in range(2))
        averages.append(dict(learner=learner, kind=kind, data="average", datasets=list(numbers), base=base, new=new,
                             hm=scoring.harmonic_mean(base, new)))
    return cells, averages


@pytest.mark.slow
def test_the_papers_numbers_stand_beside_ours_on_its_datasets(tmp_path):
    """Fabricated numbers on EuroSAT and DTD (no training): Fig. 1's hatched bars are the paper's Tab. 1
    mean over those two datasets; the Tab. 1 figure has an average panel and one per dataset in Tab. 1's
    order, each bar with the paper's (base, new, H); zero-shot CLIP has no paper number."""
    cells, averages = fabricated((("coop", "backbone", {"eurosat": (80.0, 50.0), "dtd": (70.0, 40.0)}),
                                  ("coop", "dpc", {"eurosat": (90.0, 50.0), "dtd": (75.0, 40.0)}),
                                  ("Zero-shot CLIP", "zeroshot", {"eurosat": (60.0, 55.0), "dtd": (50.0, 45.0)})))
    rows = [dict(run=str(tmp_path / "runs" / k / "seed1"), kind=k, seed=1) for k in ("coop", "coop_dpc")]

    figures.draw_fig1(averages, rows, str(tmp_path))
    fig1 = check_drawn(tmp_path / "fig1_base", (960, 630))
    bars = by_method(fig1["bars"])
    assert bars["coop", "backbone"]["paper_base"] == pytest.approx((87.60 + 80.09) / 2)   # Tab. 1: EuroSAT, DTD
    assert bars["coop", "dpc"]["paper_base"] == pytest.approx((93.40 + 84.61) / 2)
    assert (bars["coop", "dpc"]["base"], fig1["zero_shot"][0]["base"]) == (82.5, 55.0)
    assert fig1["paper_note"].startswith("hatched: the paper's Tab. 1")
    assert f"2 runs under {figures.shown_path(str(tmp_path / 'runs'))}, seed 1." in fig1["caption"]

    figures.draw_tab1(cells, averages, rows, str(tmp_path))
    tab1 = check_drawn(tmp_path / "tab1_base_new_h", (1620, 600))   # 3 panels: 3 x 3.6 in wide
    assert [p["data"] for p in tab1["panels"]] == ["average", "dtd", "eurosat"]
    eurosat = by_method(tab1["panels"][2]["bars"])
    assert eurosat["coop", "backbone"]["paper"] == pytest.approx([87.60, 51.62, scoring.harmonic_mean(87.60, 51.62)])
    assert [eurosat["coop", "dpc"][m] for m in ("base", "new")] == [90.0, 50.0]
    assert eurosat["Zero-shot CLIP", "zeroshot"]["paper"] is None
    assert [b["kind"] for b in tab1["panels"][0]["bars"]] == ["zeroshot", "backbone", "dpc"]   # Tab. 1's row order


# ---------------------------------------------------------------------------------------------
# Fig. 5: each backbone's H beside + DePT and + DPC (runs of train_backbone.py --dept)

@pytest.fixture(scope="module")
def dept_runs(runs, tmp_path_factory):
    """coop + DePT, seeds 1 and 2, on the data of `runs`, in a folder of their own (test_evaluate's tests
    count the runs under runs["runs"])."""
    base = tmp_path_factory.mktemp("dept")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)   # train_backbone.py writes output/last_backbone.txt under the cwd
        for seed in (1, 2):
            tb.main(tb.get_args(["--learner", "coop", "--dept", "--data", "synthetic", "--root", runs["root"], "--clip",
                                 "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--shots", "4",
                                 "--seed", str(seed), "--output-dir", str(base / "runs" / "coop_dept" / f"seed{seed}")]))
    return str(base / "runs")


@pytest.mark.slow
def test_fig5_holds_aggregates_h_of_each_kind_and_fig1_gains_depts_bars(runs, dept_runs, tmp_path, capsys):
    out = evaluate_main(runs["runs"], dept_runs, "--figures", "--out", tmp_path)
    stdout = capsys.readouterr().out
    assert written_figures(stdout) == sorted(str(tmp_path / name) for name in TAB1_FILES + FIG5_FILES)
    groups, averages = by_method(out["groups"]), by_method(out["averages"])
    assert set(groups) == {("coop", "backbone"), ("coop", "dept"), ("coop", "dpc")}

    (row,) = out["fig5"]["rows"]          # the table's numbers: aggregate's H, the same cells as Tab. 1's
    assert row["learner"] == "coop" and out["fig5"]["datasets"] == ["synthetic"] and out["fig5"]["left_out"] == []
    for kind in scoring.KINDS:
        assert row["per_dataset"]["synthetic"][kind] == groups["coop", kind]["hm"] == averages["coop", kind]["hm"]
        assert row["average"][kind] == averages["coop", kind]["hm"] and row["average_over"][kind] == ["synthetic"]
    hs = [f"{row['average'][k]:.2f}" for k in scoring.KINDS]
    printed = stdout[stdout.index("Fig. 5: H of each backbone, + DePT, + DPC"):].splitlines()
    assert printed[3].split() == ["backbone", "+", "DePT", "+", "DPC"] and printed[4].split() == ["CoOp"] + hs
    assert f"| CoOp | {' | '.join(hs)} |" in (tmp_path / "fig5.md").read_text()
    assert read_json(tmp_path / "results.json")["fig5"] == out["fig5"]

    fig5 = check_drawn(tmp_path / "fig5_hm", (960, 630))    # the picture's bars: the table's average block
    assert [(b["method"], b["hm"], b["datasets"]) for b in fig5["bars"]] == \
        [(scoring.method("coop", k), row["average"][k], ["synthetic"]) for k in scoring.KINDS]
    assert fig5["missing"] == [] and fig5["caption"].startswith("From 6 runs under ")

    fig1 = check_drawn(tmp_path / "fig1_base", (960, 630))   # Fig. 1: backbone, + DePT, + DPC, in that order
    assert [(b["kind"], b["base"], b["paper_base"]) for b in fig1["bars"]] == \
        [(k, averages["coop", k]["base"], None) for k in scoring.KINDS]
    (panel,) = check_drawn(tmp_path / "tab1_base_new_h", (960, 600))["panels"]
    assert [b["kind"] for b in panel["bars"]] == list(scoring.KINDS)


@pytest.mark.slow
def test_fig5_marks_a_missing_run_and_an_average_over_fewer_datasets(tmp_path):
    """Fabricated numbers (no training): CoOp has no + DPC run, MaPLe's + DePT ran on EuroSAT only,
    PromptKD has no + DePT run (DePT is not defined for it): "–" in the table and no bar, a note each."""
    cells, averages = fabricated((("coop", "backbone", {"eurosat": (80.0, 50.0), "dtd": (70.0, 40.0)}),
                                  ("coop", "dept", {"eurosat": (85.0, 52.0), "dtd": (72.0, 41.0)}),
                                  ("maple", "backbone", {"eurosat": (82.0, 60.0), "dtd": (75.0, 50.0)}),
                                  ("maple", "dept", {"eurosat": (88.0, 62.0)}),
                                  ("maple", "dpc", {"eurosat": (90.0, 60.0), "dtd": (80.0, 50.0)}),
                                  ("promptkd", "backbone", {"eurosat": (90.0, 70.0), "dtd": (80.0, 60.0)})))
    h = {(a["learner"], a["kind"]): f"{a['hm']:.2f}" for a in averages}
    text = scoring.format_fig5(cells, averages)
    lines = text.splitlines()
    assert lines[2].split()[:5] == ["Method", "Avg", "over", "2", "datasets"]
    coop, maple = (next(x.split()[1:] for x in lines if x.startswith(name)) for name in ("CoOp", "MaPLe"))
    assert coop[:3] == [h["coop", "backbone"], h["coop", "dept"], "–"] and coop[5] == coop[8] == "–"
    assert maple[:3] == [h["maple", k] for k in scoring.KINDS] and maple[4] == "–"   # DTD's + DePT
    assert "note: the MaPLe + DePT average is over eurosat only" in text
    assert "note: no + DePT run of PromptKD: not in Fig. 5" in text and "PromptKD  " not in text

    rows = [dict(run=str(tmp_path / "runs" / k / "seed1"), kind=k, seed=1) for k in ("coop", "coop_dept")]
    figures.draw_fig5(cells, averages, rows, str(tmp_path))
    fig5 = check_drawn(tmp_path / "fig5_hm", (960, 630))
    assert [(b["learner"], b["kind"]) for b in fig5["bars"]] == [("coop", "backbone"), ("coop", "dept"), ("maple", "backbone"),
                                                                  ("maple", "dept"), ("maple", "dpc")]
    assert [f"{b['hm']:.2f}" for b in fig5["bars"]] == [h[b["learner"], b["kind"]] for b in fig5["bars"]]
    assert fig5["missing"] == ["CoOp + DPC"] and fig5["left_out"] == ["promptkd"]
    assert "MaPLe + DePT over eurosat only" in fig5["caption"]


# ---------------------------------------------------------------------------------------------
# Sweep mode: Fig. 6

@pytest.mark.slow
@pytest.mark.parametrize("parameter, extra, axis", [
    ("omega_b", ["--values", "0.1,0.5,1", "--base-inference", "mixed"], dict(scale="linear")),
    ("omega_n", ["--values", "0,1e-6,0.1,1"], dict(scale="symlog", linthresh=1e-6, linscale=0.5)),
])
def test_fig6_curves_are_the_sweeps_seed_means(runs, tmp_path, capsys, parameter, extra, axis):
    out = evaluate_main(runs["runs"], "--sweep", parameter, *extra, "--figures", "--out", tmp_path)
    stem = tmp_path / f"fig6_{parameter}"
    assert written_figures(capsys.readouterr().out) == sorted(f"{stem}.{ext}" for ext in ("png", "pdf", "json"))
    fig6 = check_drawn(stem, (960, 630))
    sweep = read_json(tmp_path / "sweep.json")
    assert fig6["values"] == sweep["values"] == out["values"]
    assert {c["key"]: c["accuracies"] for c in fig6["curves"]} == sweep["mean_over_seeds"] == out["mean_over_seeds"]
    (curve,) = fig6["curves"]
    per_seed = [r["accuracies"] for r in sweep["runs"]]
    assert curve["seeds"] == [1, 2] and curve["accuracies"] == pytest.approx([sum(c) / 2 for c in zip(*per_seed)])
    paper = scoring.PAPER_FIG6[parameter]
    assert (fig6["paper"]["values"], fig6["paper"]["accuracies"]) == (list(paper), list(paper.values()))
    assert fig6["x_axis"] == axis and fig6["split"] == ("base" if parameter == "omega_b" else "new")
    assert fig6["caption"].startswith(f"From 2 runs under {figures.shown_path(runs['runs'])}/coop_dpc, seeds 1, 2.")


def test_fig6_draws_a_curve_per_learner_and_dataset_from_the_seed_means():
    """A fabricated sweep result whose seeds differ (the tiny CLIP's do not): each curve is the result's
    mean over seeds of its learner and dataset, not one seed's accuracies."""
    runs = [dict(run=f"/r/{learner}/{seed}", learner=learner, data=name, seed=seed, base_inference="mixed", accuracies=acc)
            for learner, name, seed, acc in (("coop", "eurosat", 1, [70.0, 80.0]), ("coop", "eurosat", 2, [72.0, 84.0]),
                                             ("maple", "dtd", 1, [60.0, 50.0]))]
    result = dict(parameter="omega_b", split="base", values=[0.1, 1.0], runs=runs,
                  mean_over_seeds={"coop/eurosat": [71.0, 82.0], "maple/dtd": [60.0, 50.0]})
    numbers = figures.fig6_numbers(result)
    assert [(c["method"], c["data"], c["seeds"], c["accuracies"]) for c in numbers["curves"]] == [
        ("CoOp + DPC", "eurosat", [1, 2], [71.0, 82.0]), ("MaPLe + DPC", "dtd", [1], [60.0, 50.0])]
    assert numbers["figure"] == "Fig. 6a" and numbers["metric"] == "base-class accuracy (%)"


def test_the_pdf_is_drawn_with_the_pngs_layout(tmp_path, monkeypatch):
    """write_figure runs constrained layout once, for the PNG; the PDF's page is the figure's size and its
    axes stand where the PNG's do."""
    from matplotlib.layout_engine import ConstrainedLayoutEngine
    runs = []
    real = ConstrainedLayoutEngine.execute
    monkeypatch.setattr(ConstrainedLayoutEngine, "execute", lambda self, fig: runs.append(1) or real(self, fig))
    fig = figures.new_figure((4.0, 3.0))
    for ax in fig.subplots(2, 2).flat:
        ax.plot([0, 1], [0, 1])
        ax.set_ylabel("a long label\non two lines")
    positions = []
    real_savefig = fig.savefig
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: real_savefig(*a, **k) or
                        positions.append([ax.get_position().bounds for ax in fig.axes]))
    figures.write_figure(fig, {}, str(tmp_path / "f"))
    assert len(runs) == 1 and len(positions) == 2 and positions[0] == positions[1]
    assert positions[0] != [ax.get_subplotspec().get_position(fig).bounds for ax in fig.axes]   # laid out
    with open(tmp_path / "f.pdf", "rb") as f:
        assert b"/MediaBox [ 0 0 288 216 ]" in f.read()                                        # 4 x 3 in
    with Image.open(tmp_path / "f.png") as image:
        assert image.size == (4 * figures.FIGURE_DPI, 3 * figures.FIGURE_DPI)


def test_omega_axis_puts_zero_on_a_linear_stretch_only_when_drawn():
    assert figures.omega_axis("omega_n", [0.0, 1e-6, 0.01]) == dict(scale="symlog", linthresh=1e-6, linscale=0.5)
    assert figures.omega_axis("omega_n", [1e-6, 0.01, 1.0]) == dict(scale="log")
    assert figures.omega_axis("omega_b", [0.0, 0.1, 1.0]) == dict(scale="linear")


# ---------------------------------------------------------------------------------------------
# Without --figures nothing is drawn; the stages never import matplotlib

@pytest.mark.slow
def test_without_figures_nothing_is_drawn(runs, tmp_path, capsys):
    evaluate_main(runs["runs"], "--out", tmp_path / "tab1")
    evaluate_main(runs["runs"], "--sweep", "omega_n", "--values", "0", "--out", tmp_path / "sweep")
    listed = {folder: sorted(n for n in os.listdir(tmp_path / folder) if not n.startswith("."))   # not the .lock
              for folder in ("tab1", "sweep")}
    assert listed == {"tab1": ["results.json", "table.md"], "sweep": ["sweep.json"]}
    assert "wrote figure" not in capsys.readouterr().out


@pytest.mark.parametrize("mode", [["--target", "synthetic"], ["--ablation"]])
def test_figures_are_refused_where_none_is_drawn(runs, tmp_path, capsys, mode):
    with pytest.raises(SystemExit) as e:
        evaluate.run([runs["runs"], *mode, "--figures", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --figures draws Tab. 1")
    assert not os.path.exists(tmp_path / "ev")


@pytest.mark.slow
def test_the_stages_never_import_matplotlib():
    """Training needs no matplotlib: importing the stages and the modules below them loads none of it; the
    first figure does (which shows the check can see it)."""
    code = ("import json, sys, train_backbone, train_dpc, evaluate, scoring, figures\n"
            "loaded = lambda: sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib')\n"
            "before = loaded()\n"
            "figures.new_figure((1.0, 1.0))\n"
            "print(json.dumps([before, bool(loaded())]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [[], True]
