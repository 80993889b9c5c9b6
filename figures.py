"""Figures of the paper's tables (Fig. 1, Fig. 5, Fig. 6, a Tab. 1 figure) and §4.4's Fig. 7 and numbers.

Every figure is a PNG, a PDF and a JSON of exactly the numbers drawn (docs/figures.md). matplotlib is
imported inside new_figure and method_colour only, so the stages, and evaluate.py without --figures or
--interpret, never load it (tests/test_figures.py).
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor

import clip_model
import prompts
import run_folder
import scoring


# ------------------------------------------------------------------------------------------------
# Figures of the tables (matplotlib, imported only here)
# ------------------------------------------------------------------------------------------------
# evaluate.py --figures draws Fig. 1 and a Base/New/H figure from its Tab. 1 numbers, and Fig. 6 from a
# sweep: each a PNG, a PDF and a JSON of exactly the numbers drawn, beside results.json or sweep.json.
# matplotlib is imported inside new_figure and method_colour only, so the stages and an evaluate.py
# without --figures never load it (tests/test_figures.py). matplotlib's Figure class draws straight to
# files: no pyplot, no backend switch in the caller's process, no display, nothing left open.

FIGURE_DPI = 150              # PNG pixels per inch (the PDF is vector)
FIGURE_SIZE = (6.4, 4.2)      # inches of Fig. 1 and Fig. 6: 960 x 630 pixels
PANEL_SIZE = (3.6, 2.8)       # inches per dataset panel of the Tab. 1 figure, at most 3 panels a row
PANEL_MARGIN = 1.2            # inches above and below the Tab. 1 panels: title, one legend row, caption
CAPTION_INCHES = 0.45         # the strip kept free at the bottom for the caption (two lines of 7 pt)
TITLE_INCHES = 0.35           # the strip kept free at the top for the title (11 pt)
LEGEND_ROW_INCHES = 0.24      # and below it for each row of a figure legend (8 pt, LEGEND_COLUMNS a row)
LEGEND_COLUMNS = 4


def check_matplotlib(flag: str) -> None:
    """Before any work: the figures need matplotlib, an optional package (one line if it is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise run_folder.RunError(f"{flag} draws with matplotlib, which is not installed here: pip install matplotlib "
                                  f"(or leave out {flag})") from None


def new_figure(size: tuple[float, float], legend_rows: int = 0):
    """A Figure of `size` inches at FIGURE_DPI whose axes matplotlib's constrained layout fits between a
    top strip (title, figure legend) and a bottom one (caption), both drawn by frame. savefig is called
    without bbox_inches="tight", so the PNG is exactly size × FIGURE_DPI pixels."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    top = TITLE_INCHES + LEGEND_ROW_INCHES * legend_rows
    fig.get_layout_engine().set(rect=(0, CAPTION_INCHES / size[1], 1, 1 - (CAPTION_INCHES + top) / size[1]))
    return fig


def frame(fig, numbers: dict, title: str, caption: str, legend: dict | None = None):
    """Title on top, then the figure legend ({label: handle}), the caption at the bottom, in the strips
    new_figure keeps free; title and caption also go into the figure's JSON (`numbers`). Plain texts, not
    suptitle: constrained layout would not stack an outside legend under a suptitle (they overlap)."""
    numbers.update(title=title, caption=caption)
    height = fig.get_figheight()
    fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=11)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 1 - TITLE_INCHES / height),
                   ncol=LEGEND_COLUMNS, fontsize=8, frameon=False)
    fig.text(0.01, 0.012, caption, fontsize=7, color="0.25", wrap=True, va="bottom")


def method_colour(learner: str, kind: str):
    """One colour per method across the figures: grey for zero-shot CLIP, then a hue of matplotlib's
    tab20c per learner in prompts.LEARNERS order (blue, orange, green, purple), in three of its shades:
    light for the backbone, medium for its + DePT, dark for its + DPC."""
    from matplotlib import colormaps
    if kind == "zeroshot":
        return "0.6"
    order = list(prompts.LEARNERS)
    i = order.index(learner) if learner in order else len(order)
    return colormaps["tab20c"]((4 * i + 2 - scoring.KINDS.index(kind) if kind in scoring.KINDS else 4 * i + 3) % 20)


def method_order(learner: str, kind: str) -> tuple:
    """Tab. 1's row order (format_table): zero-shot CLIP first, then the learners as prompts.LEARNERS
    lists them, each backbone before its + DePT and its + DPC (KINDS)."""
    order = list(prompts.LEARNERS)
    return (kind != "zeroshot", order.index(learner) if learner in order else len(order), learner,
            scoring.KINDS.index(kind) if kind in scoring.KINDS else len(scoring.KINDS))


# Fig. 1 and Fig. 5 colour a bar by its row, the same for every learner (the learner is on the x axis).
KIND_COLOURS = {"backbone": "tab:blue", "dept": "tab:green", "dpc": "tab:orange"}


def shown_path(path: str) -> str:
    """A run folder as the reader would type it: relative to the working directory when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def figure_source(rows: list[dict]) -> str:
    """The caption's opening: the run folders (their common parent when several) and the seeds the
    numbers come from, so a figure passed around on its own still says where its numbers live."""
    runs = sorted({r["run"] for r in rows if r.get("run")})
    seeds = sorted({r["seed"] for r in rows if r.get("run")})
    where = shown_path(runs[0]) if len(runs) == 1 else f"{len(runs)} runs under {shown_path(os.path.commonpath(runs))}"
    zero_shot = " + zero-shot CLIP (the runs' CLIP, no run)" if any(r.get("kind") == "zeroshot" for r in rows) else ""
    return f"From {where}, seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}{zero_shot}."


def write_figure(fig, numbers: dict, stem: str) -> list[str]:
    """<stem>.png, <stem>.pdf and <stem>.json (the numbers drawn), each written under a temporary name and
    renamed, as results.json is, so that a reader never finds half a file. The PDF keeps the layout the PNG
    was drawn with: constrained layout, half of a figure's drawing time, runs once."""
    paths = []
    for ext in ("png", "pdf"):
        path = f"{stem}.{ext}"
        fig.savefig(f"{path}.{os.getpid()}.tmp", format=ext)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
        paths.append(path)
        fig.set_layout_engine("none")
    run_folder.write_json_atomic(numbers, f"{stem}.json")
    return paths + [f"{stem}.json"]


def fig1_numbers(averages: list[dict]) -> dict:
    """Fig. 1's bars: each learner's base accuracy without DPC, with DePT (a separate stage-1 run, where
    there is one) and with DPC, the mean over the datasets found (evaluate.py's `averages`), each beside
    the paper's Tab. 1 mean over the same datasets (paper_cell: None where a dataset is not the paper's,
    the learner is not one of its four, or for + DePT, which no table of the paper lists);
    zero-shot CLIP, if evaluated, as a reference line."""
    bars = [dict(learner=a["learner"], kind=a["kind"], method=scoring.method(a["learner"], a["kind"]), datasets=a["datasets"],
                 base=a["base"], paper_base=(scoring.paper_cell(a["learner"], a["kind"], "average", a["datasets"]) or [None])[0])
            for a in sorted(averages, key=lambda a: method_order(a["learner"], a["kind"])) if a["kind"] in scoring.KINDS]
    zero_shot = [dict(method=a["learner"], datasets=a["datasets"], base=a["base"]) for a in averages
                 if a["kind"] == "zeroshot"]
    return dict(figure="Fig. 1", metric="base-class accuracy (%)", bars=bars, zero_shot=zero_shot)


def paper_note(bars: list[dict]) -> str:
    """Whether the paper's numbers are drawn beside ours, and if not why, for Fig. 1's title."""
    datasets = list(dict.fromkeys(d for b in bars for d in b["datasets"]))
    foreign = [d for d in datasets if d not in scoring.PAPER_DATASETS]
    if any(b["paper_base"] is not None for b in bars):
        return f"hatched: the paper's Tab. 1 (ViT-B/16), mean over the same {len(datasets)} dataset{'s' * (len(datasets) > 1)}"
    if foreign:
        return (f"no paper numbers apply: {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not among the "
                f"paper's 11 datasets" + (" (toy world)" if "toy" in foreign else ""))
    return "no paper numbers apply: the paper has none for these learners"


def draw_fig1(averages: list[dict], rows: list[dict], out_dir: str) -> list[str]:
    """Fig. 1 of the paper from our runs, fig1_base.png/.pdf/.json: one group of bars per learner, its
    backbone, + DePT and + DPC solid, the paper's numbers hatched beside them where they apply, zero-shot
    CLIP dashed. The y axis starts near the lowest bar, as the paper's Fig. 1 does; every bar carries its
    value (turned upright when four or more bars share a group, so that neighbouring labels never touch)."""
    numbers = fig1_numbers(averages)
    bars = numbers["bars"]
    learners = list(dict.fromkeys(b["learner"] for b in bars))
    kinds = [k for k in scoring.KINDS if any(b["kind"] == k for b in bars)]
    slots = [(k, paper) for k in kinds for paper in (False, True)   # ours, then the paper's where it has one
             if not paper or any(b["paper_base"] is not None for b in bars if b["kind"] == k)]
    width = min(0.8, 0.3 * len(slots)) / len(slots)
    upright = len(slots) > 3
    label = dict(fmt="%.2f", fontsize=7, **(dict(rotation=90, padding=2) if upright else {}))
    n_legend = len(slots) + len(numbers["zero_shot"])
    fig = new_figure(FIGURE_SIZE, -(-n_legend // LEGEND_COLUMNS))
    ax = fig.subplots()
    for b in bars:
        x = learners.index(b["learner"]) - width * len(slots) / 2 + width * (slots.index((b["kind"], False)) + 0.5)
        colour, name = KIND_COLOURS[b["kind"]], scoring.KIND_NAMES[b["kind"]]
        ax.bar_label(ax.bar(x, b["base"], width, color=colour, label=f"{name} (ours)"), **label)
        if b["paper_base"] is not None:
            drawn = ax.bar(x + width, b["paper_base"], width, facecolor="white", edgecolor=colour, hatch="///",
                           label=f"{name} (paper)")
            ax.bar_label(drawn, **label)
    for z in numbers["zero_shot"]:
        ax.axhline(z["base"], color="0.4", linestyle="--", linewidth=1, label=f"{z['method']} (ours)")
    values = [b["base"] for b in bars] + [b["paper_base"] for b in bars if b["paper_base"] is not None] + \
             [z["base"] for z in numbers["zero_shot"]]
    low = max(0.0, 5 * ((min(values) - 8) // 5))
    ax.set_ylim(low, max(values) + (0.22 if upright else 0.12) * (max(values) - low) + 1)
    ax.set_xticks(range(len(learners)), [scoring.NAMES.get(name, name) for name in learners])
    ax.set_xlabel("prompt learner (stage 1), without and with DPC (stage 2)" if "dept" not in kinds else
                  "prompt learner (stage 1); + DePT: stage 1 with DePT's head; + DPC: stage 2")
    ax.set_ylabel(f"base-class accuracy (%), axis from {low:g}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))   # the bars in their order, then zero-shot CLIP (matplotlib lists lines first)
    legend = {k: unique[k] for k in [f"{scoring.KIND_NAMES[k]} ({'paper' if paper else 'ours'})" for k, paper in slots]
              + [f"{z['method']} (ours)" for z in numbers["zero_shot"]]}
    datasets = list(dict.fromkeys(d for b in bars for d in b["datasets"]))
    numbers["paper_note"] = paper_note(bars)
    ax.set_title(numbers["paper_note"], fontsize=8)
    partial = [f"{b['method']} over {', '.join(b['datasets'])} only" for b in bars if len(b["datasets"]) != len(datasets)]
    frame(fig, numbers, f"Fig. 1: base-class accuracy, mean over {len(datasets)} dataset{'s' * (len(datasets) > 1)}",
          f"{figure_source(rows)} Per dataset the mean over seeds, then the mean over "
          f"{', '.join(map(scoring.dataset_title, datasets))}{'; ' + '; '.join(partial) if partial else ''}.", legend)
    return write_figure(fig, numbers, os.path.join(out_dir, "fig1_base"))


def tab1_numbers(cells: list[dict], averages: list[dict]) -> dict:
    """The Base/New/H figure's panels, as format_table lays Tab. 1 out: the average over datasets (when
    there are several) and each dataset, each method's seed-mean base, new and H from evaluate.py, and
    the paper's (base, new, H) where it has them (paper_cell)."""
    datasets_of = {(a["learner"], a["kind"]): a["datasets"] for a in averages}
    order = {d: i for i, d in enumerate(scoring.PAPER_DATASETS)}
    names = sorted({c["data"] for c in cells}, key=lambda d: (order.get(d, len(order)), d))
    panels = []
    for name in names if len(names) == 1 else ["average"] + names:
        chosen = averages if name == "average" else [c for c in cells if c["data"] == name]
        bars = [dict(learner=c["learner"], kind=c["kind"], method=scoring.method(c["learner"], c["kind"]), base=c["base"],
                     new=c["new"], hm=c["hm"], paper=scoring.paper_cell(c["learner"], c["kind"], name, datasets_of[c["learner"], c["kind"]]))
                for c in sorted(chosen, key=lambda c: method_order(c["learner"], c["kind"]))]
        title = f"Average over {len(names)} datasets" if name == "average" else scoring.dataset_title(name)
        panels.append(dict(data=name, title=title, bars=bars))
    return dict(figure="Tab. 1", metric="accuracy (%)", panels=panels)


def tab1_size(n_panels: int, legend_rows: int = 1) -> tuple[float, float]:
    """Inches of the Tab. 1 figure: up to 3 panels a row, never narrower than FIGURE_SIZE (the legend),
    taller by a legend row for each row beyond the first (5+ methods: all four learners with + DPC)."""
    columns = min(3, n_panels)
    rows = -(-n_panels // columns)
    return (max(FIGURE_SIZE[0], PANEL_SIZE[0] * columns),
            PANEL_SIZE[1] * rows + PANEL_MARGIN + LEGEND_ROW_INCHES * max(0, legend_rows - 1))


def draw_tab1(cells: list[dict], averages: list[dict], rows: list[dict], out_dir: str) -> list[str]:
    """Tab. 1 as a figure, tab1_base_new_h.png/.pdf/.json: a panel per dataset (and their average), in
    each the Base, New and H bars of every method, the paper's number as a black tick on a bar where
    the paper has one. All panels share one y axis from 0 to 100%."""
    numbers = tab1_numbers(cells, averages)
    panels = numbers["panels"]
    columns = min(3, len(panels))
    n_legend = len({b["method"] for p in panels for b in p["bars"]}) + any(b["paper"] for p in panels for b in p["bars"])
    legend_rows = -(-n_legend // LEGEND_COLUMNS)
    fig = new_figure(tab1_size(len(panels), legend_rows), legend_rows)
    axes = fig.subplots(-(-len(panels) // columns), columns, squeeze=False, sharey=True)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        width = 0.8 / len(panels[i]["bars"])
        for j, b in enumerate(panels[i]["bars"]):
            xs = [k - 0.4 + width * (j + 0.5) for k in range(3)]
            ax.bar(xs, [b["base"], b["new"], b["hm"]], width, color=method_colour(b["learner"], b["kind"]), label=b["method"])
            if b["paper"] is not None:
                ax.scatter(xs, b["paper"], marker="_", s=60, linewidths=2, color="black", zorder=3, label="paper (Tab. 1)")
        ax.set_xticks(range(3), ["Base", "New", "H"])
        ax.set_title(panels[i]["title"], fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        if i % columns == 0:
            ax.set_ylabel("accuracy (%)")
    unique = {}
    for ax in axes.ravel():
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles))
    if "paper (Tab. 1)" in unique:   # the methods first, in Tab. 1's order (matplotlib lists the ticks first)
        unique["paper (Tab. 1)"] = unique.pop("paper (Tab. 1)")
    frame(fig, numbers, "Tab. 1: accuracy on base and new classes, and H", f"{figure_source(rows)} Base and New: mean over "
          f"seeds; H: their harmonic mean (of the means); the average: mean over datasets (table.md).", unique)
    return write_figure(fig, numbers, os.path.join(out_dir, "tab1_base_new_h"))


def draw_fig5(cells: list[dict], averages: list[dict], rows: list[dict], out_dir: str) -> list[str]:
    """Fig. 5 of the paper from our runs, fig5_hm.png/.pdf/.json: per learner with a + DePT run a group of
    three bars, the H of its backbone, + DePT and + DPC over the datasets (fig5_numbers, the Fig. 5 table's
    average block); each bar carries its value; a missing run leaves its place empty, marked "no run". The
    y axis starts near the lowest bar, as Fig. 1's. The JSON holds the bars drawn (no paper numbers: the
    paper's Fig. 5 is a picture)."""
    table = scoring.fig5_numbers(cells, averages)
    bars = [dict(learner=r["learner"], kind=k, method=scoring.method(r["learner"], k), datasets=r["average_over"][k],
                 hm=r["average"][k]) for r in table["rows"] for k in scoring.KINDS if r["average"][k] is not None]
    numbers = dict(figure="Fig. 5", metric="H (%)", bars=bars, left_out=table["left_out"],
                   missing=[scoring.method(r["learner"], k) for r in table["rows"] for k in scoring.KINDS if r["average"][k] is None])
    learners = [r["learner"] for r in table["rows"]]
    width = 0.8 / len(scoring.KINDS)
    fig = new_figure(FIGURE_SIZE, 1)
    ax = fig.subplots()
    values = [b["hm"] for b in bars]
    low = max(0.0, 5 * ((min(values) - 8) // 5))
    for i, learner in enumerate(learners):
        for j, kind in enumerate(scoring.KINDS):
            x = i - 0.4 + width * (j + 0.5)
            b = next((b for b in bars if (b["learner"], b["kind"]) == (learner, kind)), None)
            if b is None:
                ax.text(x, low, "no run", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
            else:
                ax.bar_label(ax.bar(x, b["hm"], width, color=KIND_COLOURS[kind], label=scoring.KIND_NAMES[kind]),
                             fmt="%.2f", fontsize=7)
    ax.set_ylim(low, max(values) + 0.12 * (max(values) - low) + 1)
    ax.set_xticks(range(len(learners)), [scoring.NAMES.get(name, name) for name in learners])
    ax.set_xlabel("prompt learner; + DePT: its own stage-1 run; + DPC: stage 2 on the backbone")
    ax.set_ylabel(f"H (%), axis from {low:g}")
    handles, labels = ax.get_legend_handles_labels()
    datasets = table["datasets"]
    partial = [f"{b['method']} over {', '.join(b['datasets'])} only" for b in bars if set(b["datasets"]) != set(datasets)]
    left_out = f"; no + DePT run of {', '.join(scoring.NAMES.get(x, x) for x in table['left_out'])}" if table["left_out"] else ""
    over = "the paper's 11 datasets" if set(datasets) == set(scoring.PAPER_DATASETS) else ", ".join(map(scoring.dataset_title, datasets))
    frame(fig, numbers, f"Fig. 5: H of each backbone, + DePT, + DPC, mean over {len(datasets)} "
          f"dataset{'s' * (len(datasets) > 1)}",
          f"{figure_source(rows)} H of base and new, each averaged over seeds, then over "
          f"{over} (Tab. 1's){'; ' + '; '.join(partial) if partial else ''}"
          f"{left_out}. No paper numbers: its Fig. 5 is a picture.", dict(zip(labels, handles)))
    return write_figure(fig, numbers, os.path.join(out_dir, "fig5_hm"))


def omega_axis(parameter: str, omegas: list[float]) -> dict:
    """The x axis of a Fig. 6 sweep: linear for ω_b (grid 0.1 ... 1), logarithmic for ω_n, whose useful
    values span 1e-6 (the paper's default) to 1. ω_n = 0 (P alone, Eq. 13) has no place on a log axis,
    so with a 0 the axis is matplotlib's symlog: linear from 0 to the smallest positive ω_n (linthresh),
    logarithmic above, the linear stretch drawn half a decade wide (linscale)."""
    positive = [w for w in omegas if w > 0]
    if parameter == "omega_b" or not positive:
        return dict(scale="linear")
    if len(positive) == len(omegas):
        return dict(scale="log")
    return dict(scale="symlog", linthresh=min(positive), linscale=0.5)


def fig6_numbers(result: dict) -> dict:
    """Fig. 6's curves from evaluate.sweep's result (sweep.json): per learner and dataset, the swept
    accuracy at each ω, averaged over seeds (its mean_over_seeds), and the paper's points (PAPER_FIG6:
    CoOp + DPC, mean over its 11 datasets, read off its plot); base accuracy for ω_b, new for ω_n."""
    runs = {f"{r['learner']}/{r['data']}": r for r in result["runs"]}
    curves = [dict(key=key, learner=runs[key]["learner"], data=runs[key]["data"], method=scoring.method(runs[key]["learner"], "dpc"),
                   seeds=sorted(r["seed"] for r in result["runs"] if f"{r['learner']}/{r['data']}" == key), accuracies=acc)
              for key, acc in result["mean_over_seeds"].items()]
    paper = scoring.PAPER_FIG6[result["parameter"]]
    return dict(figure="Fig. 6" + ("a" if result["parameter"] == "omega_b" else "b"), parameter=result["parameter"],
                split=result["split"], metric=f"{result['split']}-class accuracy (%)", values=result["values"],
                curves=curves, paper=dict(values=list(paper), accuracies=list(paper.values())),
                base_inference=sorted({r["base_inference"] for r in result["runs"]}),
                x_axis=omega_axis(result["parameter"], result["values"] + list(paper)))


def draw_fig6(result: dict, out_dir: str) -> list[str]:
    """Fig. 6 from a sweep, fig6_omega_b or fig6_omega_n .png/.pdf/.json: a curve per learner and dataset
    (seeds averaged) over the swept ω, the paper's CoOp points beside it as hollow squares."""
    numbers = fig6_numbers(result)
    base = numbers["parameter"] == "omega_b"
    symbol = r"$\omega_b$" if base else r"$\omega_n$"
    fig = new_figure(FIGURE_SIZE)
    ax = fig.subplots()
    for c in numbers["curves"]:
        seeds = f"seed{'s' * (len(c['seeds']) > 1)} {', '.join(map(str, c['seeds']))}"
        ax.plot(numbers["values"], c["accuracies"], marker="o", label=f"{c['method']} on {scoring.dataset_title(c['data'])} (ours, {seeds})")
    ax.plot(numbers["paper"]["values"], numbers["paper"]["accuracies"], linestyle=":", marker="s", markerfacecolor="none",
            color="black", label="paper: CoOp + DPC, mean of its 11 datasets")
    axis = dict(numbers["x_axis"])
    ax.set_xscale(axis.pop("scale"), **axis)
    ax.set_xlabel(f"{symbol}: weight of P′ in the " + ("base-class prompt (Eq. 12; 0 = P, the backbone)" if base
                                                     else "new-class prompt (Eq. 13; 0 = P alone)"))
    ax.set_ylabel(numbers["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    notes = [f"Evaluation only: each trained run re-weighted at every {symbol}, seeds averaged"]
    if base:
        notes.append(f"base inference {', '.join(numbers['base_inference'])}"
                     + (f" (P′ for every {symbol}: flat; pass --base-inference mixed)" if "parallel" in numbers["base_inference"] else "")
                     + f"; the paper retrained per {symbol}")
    if axis.get("linthresh"):
        notes.append(f"x axis logarithmic above {axis['linthresh']:g}, linear from 0 to it (symlog) so that {symbol} = 0 shows")
    if not any(c["data"] in scoring.PAPER_DATASETS for c in numbers["curves"]):
        notes.append("the paper's points are its own 11 datasets', not comparable to these")
    frame(fig, numbers, f"{numbers['figure']}: {numbers['split']}-class accuracy against {symbol}",
          f"{figure_source(result['runs'])} {'; '.join(notes)}.")
    return write_figure(fig, numbers, os.path.join(out_dir, f"fig6_{numbers['parameter']}"))


# ------------------------------------------------------------------------------------------------
# Fig. 7 (§4.4): the prompt before tuning, P and P' as feature maps (evaluate.py --interpret)
# ------------------------------------------------------------------------------------------------

# The numbers of §4.4 (evaluate.interpret): channel invariance per context vector, nearest words.

def channel_invariance(moved: Tensor, reference: Tensor) -> dict:
    """Per context vector (row) of `moved` against the same row of `reference` (M, D): cosine, the
    fraction of the D channels whose sign is kept, and Spearman's rank correlation of the channels
    (1: every channel keeps its rank among the D)."""
    def ranks(x):                                                         # (M, D) -> ranks 0..D-1 per row
        return x.argsort(dim=1).argsort(dim=1).float()
    ra, rb = ranks(moved), ranks(reference)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return dict(cosine=F.cosine_similarity(moved, reference, dim=1).tolist(),
                sign_kept=(moved.sign() == reference.sign()).float().mean(1).tolist(),
                rank_correlation=(F.cosine_similarity(ra, rb, dim=1)).tolist())


def invariance(initial: Tensor, tuned_prompt: Tensor, parallel_prompt: Tensor) -> dict:
    """§4.4's claim as numbers, per context vector: P' against P, beside P against its
    initial prompt, and how far DPC moved each vector relative to how far stage 1 moved it."""
    return {"parallel_vs_tuned": channel_invariance(parallel_prompt, tuned_prompt),
            "tuned_vs_initial": channel_invariance(tuned_prompt, initial),
            "shift_ratio": ((parallel_prompt - tuned_prompt).norm(dim=1)
                            / (tuned_prompt - initial).norm(dim=1)).tolist()}   # ‖P'−P‖ / ‖P−P_0‖


def nearest_words(context: Tensor, token_embedding: Tensor, k: int) -> list[list[tuple[str, float]]]:
    """CoOp's interpret_prompt.py: each context vector's k nearest tokens of CLIP's token-embedding
    table (Euclidean distance), decoded with the vendored BPE vocabulary."""
    distance = torch.cdist(context.float(), token_embedding.float())     # (M, vocab)
    values, ids = distance.topk(k, dim=1, largest=False)
    decoder = clip_model.tokenizer()
    return [[(decoder.decode([i]).strip(), round(v, 4)) for i, v in zip(row_ids.tolist(), row.tolist())]
            for row_ids, row in zip(ids, values)]


def interpretation_summary(runs: list[dict]) -> dict:
    """Each number's mean over every context vector of every run, and the fraction of vectors that DPC
    moved less than stage 1 did (‖P'−P‖ < ‖P−P_0‖): docs/figures.md's §4.4 numbers for the toy world."""
    def every(part, key):
        return [v for r in runs for t in r["tensors"].values() for v in (t[part][key] if part else t[key])]
    out = {f"{part} {key}": scoring.mean(every(part, key)) for part in ("parallel_vs_tuned", "tuned_vs_initial")
           for key in ("cosine", "sign_kept", "rank_correlation")}
    ratios = every(None, "shift_ratio")
    out.update(shift_ratio=scoring.mean(ratios), closer_than_stage1=sum(r < 1 for r in ratios) / len(ratios),
               vectors=len(ratios), runs=len(runs))
    return out


def format_interpretation(out: dict) -> str:
    """evaluate.py --interpret's printout: the numbers of each run's pictured tensor per context vector,
    its nearest words, and the summary."""
    lines = []
    for r in out["runs"]:
        inv = r["tensors"][r["pictured"]]
        lines.append(f"\n§4.4 {r['learner']} + DPC, {r['data']} seed {r['seed']}: {r['pictured']} (initial prompt: "
                     f"{r['initial']})\n  vector  cos(P',P)  cos(P,P0)  sign kept P'/P  P/P0  rank rho P'/P  P/P0  "
                     f"|P'-P|/|P-P0|")
        a, b = inv["parallel_vs_tuned"], inv["tuned_vs_initial"]
        for m in range(len(inv["shift_ratio"])):
            lines.append(f"  {m + 1:6d}  {a['cosine'][m]:9.4f}  {b['cosine'][m]:9.4f}  {a['sign_kept'][m]:14.3f}  "
                         f"{b['sign_kept'][m]:4.3f}  {a['rank_correlation'][m]:13.4f}  {b['rank_correlation'][m]:4.4f}  "
                         f"{inv['shift_ratio'][m]:13.4f}")
        for which, rows in r["nearest_words"].items():
            for m, words in enumerate(rows):
                lines.append(f"  nearest words of {which} vector {m + 1}: "
                             + ", ".join(f"{w} ({d:.3f})" for w, d in words))
    lines.append("\nmean over " + f"{out['summary']['vectors']} context vectors of {out['summary']['runs']} run(s): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in out["summary"].items() if k not in ("vectors", "runs")))
    return "\n".join(lines)


FIG7_WIDTH, FIG7_ROW = 6.4, 1.3     # inches: Fig. 7 is 960 px wide, 195 px per context vector, plus its strips


def feature_map(vector: list[float]):
    """A context vector's D channels as a 2-D map, as Fig. 7 lays them out (the paper does not say how):
    row-major into h × w, h the largest divisor of D up to √D (ViT-B/16's 512 -> 16 × 32; the toy CLIP's
    64 -> 8 × 8), then s × s mean pooling to at most 16 columns (the paper's "down-sampled for
    readability"; 512 -> 8 × 16). Returns the map and the sentence that says how it was made."""
    import numpy as np
    d = len(vector)
    h = max(i for i in range(1, int(d ** 0.5) + 1) if d % i == 0)
    w = d // h
    s = next(f for f in range(max(1, w // 16), 0, -1) if h % f == 0 and w % f == 0)
    grid = np.asarray(vector, dtype=np.float64).reshape(h // s, s, w // s, s).mean(axis=(1, 3))
    return grid, f"{d} channels row-major as {h}×{w}" + (f", {s}×{s} mean-pooled to {h // s}×{w // s}" if s > 1 else "")


def draw_fig7(r: dict, stem: str) -> list[str]:
    """Fig. 7 of one DPC run (an entry of evaluate.interpret): per context vector of the pictured tensor,
    (a) the prompt before tuning, (b) the tuned P, (c) P', on one colour scale per vector, with
    cos(P', P) and cos(P, P_0) beside it. stem.png/.pdf, and stem.json with the maps drawn."""
    columns = (("initial", f"(a) before tuning: {r['initial']}"), ("P", "(b) tuned prompt P"),
               ("P'", r"(c) parallel prompt $P'$"))
    inv, vectors = r["tensors"][r["pictured"]], len(r["prompts"]["P"])
    fig = new_figure((FIG7_WIDTH, FIG7_ROW * vectors + PANEL_MARGIN))
    axes = fig.subplots(vectors, 3, squeeze=False)
    maps = [[feature_map(r["prompts"][key][m]) for key, _ in columns] for m in range(vectors)]
    for m in range(vectors):
        top = max(float(abs(grid).max()) for grid, _ in maps[m]) or 1.0
        for c, (_, title) in enumerate(columns):
            image = axes[m][c].imshow(maps[m][c][0], cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
            axes[m][c].set_xticks([])
            axes[m][c].set_yticks([])
            if m == 0:
                axes[m][c].set_title(title, fontsize=8)
        axes[m][0].set_ylabel(f"vector {m + 1}\ncos(P', P) {inv['parallel_vs_tuned']['cosine'][m]:.3f}\n"
                              f"cos(P, P0) {inv['tuned_vs_initial']['cosine'][m]:.3f}", fontsize=7)
        bar = fig.colorbar(image, ax=list(axes[m]), shrink=0.9)
        bar.set_label("channel value", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    numbers = dict(figure="Fig. 7", run=r["run"], pictured=r["pictured"], initial=r["initial"],
                   maps={key: [maps[m][c][0].tolist() for m in range(vectors)] for c, (key, _) in enumerate(columns)})
    frame(fig, numbers, f"Fig. 7: {r['learner']} + DPC, {r['data']}, seed {r['seed']}: {r['pictured']}",
          f"From {shown_path(r['run'])} (backbone {shown_path(r['backbone'])}). Each map: {maps[0][0][1]}; one colour "
          f"scale per context vector. P0: the stage-1 learner's initialisation under the run's seed.")
    return write_figure(fig, numbers, stem)
