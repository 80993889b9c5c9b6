"""Evaluate finished runs of train_backbone.py / train_dpc.py and lay them out like the paper's Tab. 1.

DPC paper §4.2 (Tab. 1 base-to-new, Tab. 2 cross-dataset/-domain) and §4.3 (Tab. 3 components, Fig. 6
collaboration weights, Tab. 4 top-K, Tab. 5 fewer epochs). Base/new accuracies come from each run's results.json,
or are recomputed from checkpoint.pt with the training scripts' own evaluation functions
(scoring.base_to_new, train_dpc.evaluate_dpc). Per (learner, row, dataset) the seeds are averaged, H is the
harmonic mean of the averaged base and new (the CoCoOp/MaPLe convention, also used for the average over
datasets), and each number is printed beside the paper's (scoring.aggregate).

Tab. 1 (seeds 1-3 of each dataset, then one table; --out gets results.json and table.md):
    python train_backbone.py --learner coop --data eurosat --root /data --seed 1
    python train_dpc.py --backbone output/eurosat/coop/seed1
    python evaluate.py output/                          # every finished run below output/
    python evaluate.py output/toy --zero-shot           # + a "Zero-shot CLIP" row per dataset
    python evaluate.py output/eurosat/coop_dpc/seed1 --omega-n 0     # recomputes: new classes with P only
    python evaluate.py output/ --figures    # + Fig. 1, a Base/New/H figure; Fig. 5 with + DePT runs (docs/dept.md)
Fig. 6 (evaluation only, no retraining; sweep.json, fig6_omega_*.png with --figures), docs/figures.md:
    python evaluate.py output/eurosat/coop_dpc --sweep omega_n --values 0,1e-6,0.01,0.05,0.1,0.2
Tab. 2 (runs on ImageNet's all classes, --subsample all; transfer.json), docs/transfer.md:
    python evaluate.py xd --target cross-dataset,cross-domain --target-root /data
Tab. 3 (the runs of its five commands, one per row; ablation.json), docs/ablation.md:
    python evaluate.py tab3 --ablation
§4.4 (Fig. 7, channel invariance, nearest words; interpret.json), docs/figures.md:
    python evaluate.py output/eurosat/coop_dpc --interpret --out fig7
Tab. 4 and Tab. 5 retrain (a row averages the seeds of ONE experiment: evaluate one setting's folder per call):
    python train_dpc.py --backbone output/eurosat/coop/seed1 --topk 4 --batch-size 8 --output-dir tab4/k4/eurosat/s1
    python train_backbone.py --learner coop --data eurosat --root /data --epochs 10 --output-dir tab5/eurosat/coop/s1
    python train_dpc.py --backbone tab5/eurosat/coop/s1 --epochs 10 --output-dir tab5/eurosat/coop_dpc/s1
    python evaluate.py tab4/k4; python evaluate.py tab5
"""
import argparse
import os
from argparse import Namespace

import torch

import backbones
import checkpoints
import command_line
import data
import figures
import prompts
import run_folder
import scoring
import train_dpc as td
from run_folder import RunError, log

EPILOG = __doc__[__doc__.index("Tab. 1 ("):]  # the commands, also shown by --help


def get_args(argv=None):
    p = command_line.Parser(description=__doc__.split("\n")[0], epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (holding checkpoint.pt) or folders above them")
    p.add_argument("--recompute", action="store_true", help="recompute from checkpoint.pt, not results.json")
    p.add_argument("--zero-shot", action="store_true", help="add a 'Zero-shot CLIP' row per dataset: the runs' "
                   "CLIP with CoOp's template of the dataset ('a photo of a {}.' for other data), no training")
    # The three DPC overrides imply --recompute; each defaults to the run's own value
    p.add_argument("--omega-b", type=float, default=None,
                   help="ω_b in (0, 1] at inference: moves only the base prompt of --base-inference mixed (dpc_prompts)")
    p.add_argument("--omega-n", type=float, default=None, help="ω_n in [0, 1] (0: new classes use P alone)")
    p.add_argument("--base-inference", default=None, choices=td.BASE_INFERENCE_CHOICES,
                   help="base classes use P' (parallel) or ω_b P' + (1-ω_b) P (mixed); docs/differences.md #6")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", default=None, choices=("omega_b", "omega_n"),
                      help="Fig. 6: base (ω_b) or new (ω_n) accuracy of DPC runs at each of --values")
    mode.add_argument("--target", default=None,
                      help="Tab. 2: comma-separated datasets to test on (full test split, all classes), or the groups "
                           "cross-dataset (the 10 besides ImageNet) and cross-domain (ImageNet-V2, -Sketch, -A, -R)")
    mode.add_argument("--interpret", action="store_true",
                      help="§4.4 of DPC runs: Fig. 7 (the prompt before tuning, P, P' as feature maps), the channel "
                           "invariance numbers and the nearest words of P and P' (interpret.json, fig7_*.png/pdf)")
    mode.add_argument("--ablation", action="store_true",
                      help="Tab. 3: lay out the runs of the five ablation commands (docs/ablation.md) as its rows")
    p.add_argument("--values", default=None, help="comma-separated values for --sweep (default: Fig. 6's grid, "
                   "ω_b 0.1,0.2,0.3,0.5,1.0 (0 would be the backbone itself), ω_n 0,0.01,0.02,0.05,0.1,0.2)")
    p.add_argument("--figures", action="store_true",
                   help="also draw the results into --out as PNG + PDF + a JSON of the numbers drawn: Tab. 1 (the "
                        "default) -> fig1_base (Fig. 1), tab1_base_new_h (Base/New/H per dataset), with + DePT runs "
                        "fig5_hm (Fig. 5); --sweep -> fig6_omega_b or fig6_omega_n (Fig. 6); needs matplotlib")
    p.add_argument("--words", type=int, default=5, help="--interpret: nearest words per context vector")
    p.add_argument("--target-root", default=None, help="dataset root of --target (default: --root, else the run's)")
    p.add_argument("--root", default=None, help="dataset root (default: the one stored in each run)")
    p.add_argument("--out", default="evaluation",
                   help="where results.json + table.md (+ fig5.md), sweep.json, transfer.json or ablation.json go")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0 = in the main process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    command_line.add_feature_cache_flag(p)
    command_line.add_trust_flag(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# A run's numbers: read from results.json, or recomputed with the stages' own functions
# ------------------------------------------------------------------------------------------------

def dpc_settings(ckpt: dict, opts) -> Namespace:
    """ω_b, ω_n, base inference of a DPC run, overridden by the flags; what evaluate_dpc reads."""
    a = ckpt["args"]
    s = Namespace(omega_b=a["omega_b"] if opts.omega_b is None else opts.omega_b,
                  omega_n=a["omega_n"] if opts.omega_n is None else opts.omega_n,
                  base_inference=opts.base_inference or a["base_inference"],
                  device=opts.device, workers=opts.workers, feature_cache=opts.feature_cache)
    command_line.check_omegas(s.omega_b, s.omega_n)
    return s


def dpc_prompts(ckpt: dict, s: Namespace, device) -> tuple[dict, dict]:
    """(base-class prompt, P̃_n) of a DPC run at the settings s, from its stored P and P' (train_dpc.inference_prompts):
    at the training settings, bitwise what training evaluated."""
    tuned, parallel = stored_prompts(ckpt, device)
    return td.inference_prompts(parallel, tuned, s.omega_b, s.omega_n, s.base_inference)


def stored_prompts(ckpt: dict, device) -> tuple[dict, dict]:
    """P and P' as the DPC run stored them."""
    return ({n: t.to(device) for n, t in ckpt["tuned_prompt"].items()},
            {n: t.to(device) for n, t in ckpt["parallel_prompt"].items()})


def load_learner(run: str, ckpt: dict, opts):
    """The learner a run evaluates with: its own (backbone) or its stage-1 run's (DPC), ours or Dassl's."""
    if ckpt["kind"] == "backbone":
        return backbones.load_backbone(run, opts.device, opts.trust_checkpoint)[0]
    a = ckpt["args"]
    return backbones.load_stage1(ckpt["backbone"], opts.device, opts.trust_checkpoint, ckpt["clip"], a.get("teacher"),
                              a.get("teacher_clip"))[0]


def row_kind(ckpt: dict) -> str:
    """A run's row: "backbone", "dpc", or "dept" for a stage-1 run with DePT's head (Fig. 5's "+ DePT")."""
    return "dept" if ckpt["args"].get("dept") else ckpt["kind"]


def evaluate_run(run: str, ckpt: dict, opts) -> dict:
    """One row: base/new/HM from results.json, or recomputed from the checkpoint."""
    a, dpc = ckpt["args"], ckpt["kind"] == "dpc"
    row = dict(run=run, kind=row_kind(ckpt), learner=ckpt["learner"], data=ckpt["data"], seed=a["seed"],
               shots=a.get("shots"), epochs=a.get("epochs"), args=dict(a, clip=ckpt["clip"]))
    overrides = opts.omega_b is not None or opts.omega_n is not None or opts.base_inference is not None
    results = None if opts.recompute or (dpc and overrides) else checkpoints.read_results(run)
    row["source"] = "results.json" if results else "recomputed"
    if dpc:
        s = dpc_settings(ckpt, opts)
        row.update(omega_b=s.omega_b, omega_n=s.omega_n, base_inference=s.base_inference, topk=a.get("topk"),
                   loss=a.get("loss", "hard-negative"))
    else:
        row.update(continued=bool(a.get("continue_from")))  # Tab. 3 row (1)
    if results is None:
        root = opts.root or a["root"]
        learner = load_learner(run, ckpt, opts)
        splits = data.load_splits(ckpt["data"], root, a["shots"], a["seed"])
        if dpc:
            results = td.evaluate_dpc(learner, splits, *stored_prompts(ckpt, opts.device), s)
        else:
            results = scoring.base_to_new(learner, splits, opts.device, opts.workers, subsample=a.get("subsample", "base"),
                                          cache=opts.feature_cache)
    if "all" in results:
        row.update(all=results["all"])
    else:
        row.update(base=results["base"], new=results["new"], hm=scoring.harmonic_mean(results["base"], results["new"]))
    scoring.log_results(row, f"{scoring.method(row['learner'], row['kind'])} {row['data']} seed {row['seed']} "
                        f"[{row['source']}] {run}")
    return row


def zero_shot_template(dataset: str) -> str:
    """CoOp's hand-written template of a known dataset (CUSTOM_TEMPLATES), else "a photo of a {}."."""
    return data.DATASETS[dataset].template if dataset in data.DATASETS else "a photo of a {}."


def zero_shot_rows(finished, opts) -> list[dict]:
    """Zero-shot CLIP per (dataset, CLIP) of the base-to-new runs, as CoOp's zero-shot CLIP computes the
    "CLIP" row of every base-to-new table: the dataset's own template (zero_shot_template). The test
    splits do not depend on the seed, so one row per dataset."""
    clips = {ckpt["clip"] for _, ckpt in finished}
    rows, done = [], set()
    for _, ckpt in finished:
        a = ckpt["args"]
        key = (ckpt["data"], ckpt["clip"], opts.root or a["root"])
        if a.get("subsample", "base") == "all" or key in done:  # Tab. 2 sources have no base/new split
            continue
        done.add(key)
        template = zero_shot_template(ckpt["data"])
        learner = prompts.ZeroShotCLIP(backbones.load_clip(ckpt["clip"], opts.device), template)
        splits = data.load_splits(ckpt["data"], key[2], 0, a["seed"])
        results = scoring.base_to_new(learner.to(opts.device).eval(), splits, opts.device, opts.workers,
                                      cache=opts.feature_cache)
        name = "Zero-shot CLIP" + ("" if len(clips) == 1 else f" ({ckpt['clip']})")
        row = dict(run=None, kind="zeroshot", learner=name, data=ckpt["data"], seed=a["seed"], clip=ckpt["clip"],
                   template=template, source="computed", base=results["base"], new=results["new"], hm=results["hm"])
        scoring.log_results(row, f"{name} {ckpt['data']} [{ckpt['clip']}, template {template!r}]")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Fig. 6 sweep and Tab. 2 transfer (evaluation only)
# ------------------------------------------------------------------------------------------------

def parse_values(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise RunError(f"--values must be comma-separated numbers, got {text!r}")
    return values


def sweep(finished, opts) -> dict:
    """Base accuracy per ω_b (Fig. 6a) or new accuracy per ω_n (Fig. 6b) of every DPC run."""
    grid = [v for v in scoring.PAPER_FIG6[opts.sweep] if v > 0 or opts.sweep == "omega_n"]   # ω_b = 0 cannot decouple
    values = parse_values(opts.values) if opts.values is not None else grid
    split = "base" if opts.sweep == "omega_b" else "new"
    for v in values:  # refuse a bad value before any evaluation (ω_b = 0: Decoupling divides by it)
        command_line.check_omegas(*((v, 0.0) if opts.sweep == "omega_b" else (1.0, v)))
    finished = [(run, ckpt) for run, ckpt in finished if ckpt["kind"] == "dpc"]
    if not finished:
        raise RunError("--sweep needs DPC runs (train_dpc.py); only backbone runs were given")
    rows = []
    for run, ckpt in finished:
        a = ckpt["args"]
        root = opts.root or a["root"]
        learner = load_learner(run, ckpt, opts)
        items = data.load_splits(ckpt["data"], root, a["shots"], a["seed"])[split]["test"]
        accuracies = []
        for v in values:
            s = dpc_settings(ckpt, Namespace(**{**vars(opts), opts.sweep: v}))
            prompt = dpc_prompts(ckpt, s, opts.device)[0 if split == "base" else 1]
            accuracies.append(scoring.accuracy(learner, items, data.classnames_of(items), opts.device, opts.workers,
                                               prompt, cache=opts.feature_cache))
        rows.append(dict(run=run, learner=ckpt["learner"], data=ckpt["data"], seed=a["seed"],
                         base_inference=s.base_inference, accuracies=accuracies))
        print(f"{scoring.method(ckpt['learner'], 'dpc')} {ckpt['data']} seed {a['seed']} {split} accuracy: " +
              "  ".join(f"{opts.sweep}={v:g}: {x:.2f}" for v, x in zip(values, accuracies)))
    if split == "base" and any(r["base_inference"] == "parallel" for r in rows):
        print("note: with base inference 'parallel' (the released code) base classes use P' for every ω_b, so "
              "the sweep is flat; pass --base-inference mixed for ω_b P' + (1-ω_b) P (Eq. 12). The paper's "
              "Fig. 6a retrained per ω_b (docs/differences.md #6)")
    means = {}
    for r in rows:
        means.setdefault(f"{r['learner']}/{r['data']}", []).append(r["accuracies"])
    means = {k: [scoring.mean(col) for col in zip(*v)] for k, v in means.items()}
    for k, v in means.items():
        print(f"mean over seeds {k}: " + "  ".join(f"{x:.2f}" for x in v))
    print("paper Fig. 6 (CoOp, avg over 11 datasets, read off the plot): " +
          "  ".join(f"{v:g}: {x:.2f}" for v, x in scoring.PAPER_FIG6[opts.sweep].items()))
    return dict(parameter=opts.sweep, split=split, values=values, runs=rows, mean_over_seeds=means,
                paper_fig6_coop_average=scoring.PAPER_FIG6[opts.sweep])


def parse_targets(text: str, sources: set) -> list[str]:
    """--target: dataset names, or the groups 'cross-dataset' (Tab. 2's 10 targets: the 11 datasets
    minus ImageNet) and 'cross-domain' (ImageNet-V2, -Sketch, -A, -R)."""
    groups = {"cross-dataset": [d for d in scoring.PAPER_DATASETS if d != "imagenet"], "cross-domain": list(data.CROSS_DOMAIN)}
    targets = []
    for t in (t.strip() for t in text.split(",")):
        targets += groups.get(t, [data.dataset_name(t)] if t else [])   # CoOp's names too (imagenetv2)
    return list(dict.fromkeys(sorted(sources) + targets))   # each run's source is always tested too


def transfer(finished, opts) -> dict:
    """Tab. 2: test each run on its source's test split and on other datasets' full test split, all
    classes. DPC runs use the base prompt on the source and the new-class prompt P̃_n (≈ P, paper §4.2;
    docs/differences.md #14) on every target; backbone runs use their learner as it is. Columns: Source, the mean
    over the cross-dataset targets and the mean over the cross-domain targets (per method, seeds
    averaged first), each beside the paper's Tab. 2 number (an ImageNet source only)."""
    targets = parse_targets(opts.target, {ckpt["data"] for _, ckpt in finished})
    test_sets, rows = {}, []
    for run, ckpt in finished:
        a, dpc = ckpt["args"], ckpt["kind"] == "dpc"
        learner = load_learner(run, ckpt, opts)
        if dpc:
            s = dpc_settings(ckpt, opts)
            base_prompt, new_prompt = dpc_prompts(ckpt, s, opts.device)
        for target in targets:
            root = (opts.root or a["root"]) if target == ckpt["data"] else (opts.target_root or opts.root or a["root"])
            if (root, target) not in test_sets:   # runs from other roots read their own copy
                items = data.read_splits(root, target)["test"]
                test_sets[root, target] = (items, data.classnames_of(items))
            items, classnames = test_sets[root, target]
            # DPC: the base prompt on the source column of Tab. 2, P̃_n (Eq. 13) on every target
            prompt = (base_prompt if target == ckpt["data"] else new_prompt) if dpc else None
            acc = scoring.accuracy(learner, items, classnames, opts.device, opts.workers, prompt, cache=opts.feature_cache)
            log(f"=> result ({scoring.method(ckpt['learner'], row_kind(ckpt))} {ckpt['data']} -> {target}, "
                f"all {len(classnames)} classes, seed {a['seed']} {run})\n* accuracy: {acc:.2f}%")
            rows.append(dict(run=run, kind=row_kind(ckpt), learner=ckpt["learner"], source=ckpt["data"],
                             target=target, seed=a["seed"], accuracy=acc))
    summary = scoring.transfer_summary(rows)
    print("\n" + scoring.format_transfer(summary))
    return dict(runs=rows, mean_over_seeds=summary, paper_tab2=scoring.PAPER_TAB2_COLUMNS)


# ------------------------------------------------------------------------------------------------
# Tab. 3: the component ablation (CoOp backbone), from the run folders of its five commands
# ------------------------------------------------------------------------------------------------


def ablation_row(ckpt: dict) -> str:
    """Which Tab. 3 row a run is, from the flags it was trained with (docs/ablation.md):
    backbone / (1) train_backbone.py --continue-from; (2) train_dpc.py --omega-b 1 --omega-n 1;
    (3) --loss learner --base-inference mixed --omega-n = --omega-b; (4) --loss learner --base-inference
    mixed (ω_n = 1e-6); (5) train_dpc.py with its defaults."""
    a = ckpt["args"]
    if a.get("dept"):
        raise RunError("--ablation lays out Tab. 3's rows; a DePT run (train_backbone.py --dept) is none of them: "
                       "leave its folder out")
    if ckpt["kind"] == "backbone":
        return "(1) TS" if a.get("continue_from") else "backbone"
    if a.get("loss", "hard-negative") == "hard-negative":
        return "(2) TS + DHNO" if a["omega_b"] == a["omega_n"] == 1.0 else "(5) TS + DHNO + WE + DE"
    return "(3) TS + WE" if a["omega_n"] == a["omega_b"] else "(4) TS + WE + DE"


def ablation(finished, opts) -> dict:
    rows = []
    for run, ckpt in finished:
        row = evaluate_run(run, ckpt, opts)
        row["kind"] = ablation_row(ckpt)
        rows.append(row)
    learners = {r["learner"] for r in rows}
    if len(learners) > 1:
        raise RunError(f"--ablation lays out one learner's runs (Tab. 3: CoOp); got {sorted(learners)}: pass "
                       f"one learner's run folders")
    cells, averages = scoring.aggregate(rows)
    print("\n" + scoring.format_ablation(cells, averages), end="")
    return dict(runs=rows, groups=cells, averages=averages, paper_tab3=scoring.PAPER_TAB3)


# ------------------------------------------------------------------------------------------------
# §4.4: feature channel invariance (Fig. 7) and the nearest words of the prompts (CoOp's interpretation)
# ------------------------------------------------------------------------------------------------

def initial_prompt(backbone: dict, learner) -> tuple[dict, str]:
    """The stage-1 run's prompt before tuning, rebuilt as train_backbone.py built it: the learner's
    initialisation under the run's seed, and what it was. CoOp's default is the phrase "a photo of a",
    not the paper's random vectors: --ctx-init '' trains from N(0, 0.02²); the figure says which."""
    a = backbone["args"]
    torch.manual_seed(a["seed"])
    fresh = prompts.build_learner(backbone["learner"], learner.clip, getattr(learner, "teacher", None),
                                  a.get("n_ctx"), a.get("ctx_init"), a.get("kd_weight"))
    prefix = getattr(fresh, "prefix", "X")                # init_context: the phrase, or "X X .. X" for random
    how = "random N(0, 0.02²)" if set(prefix.split()) == {"X"} else f"phrase '{prefix}'"
    return {n: t.detach().float().cpu() for n, t in prompts.prompt_tensors(fresh).items()}, how


PICTURED = ("ctx", "visual_prompt")   # the learner's first prompt: the text context (PromptKD: its visual prompt)


def interpret(finished, opts) -> dict:
    """Per DPC run: the pictured prompt before tuning, P and P' (Fig. 7), the invariance numbers of every
    context tensor stage 1 moved, and the nearest words of P and P'; then each number's mean over the runs."""
    runs = []
    for run, ckpt in finished:
        if ckpt["kind"] != "dpc":
            continue
        learner, backbone = backbones.load_stage1(ckpt["backbone"], "cpu", opts.trust_checkpoint)
        if backbone["data"] is None:
            raise RunError(f"{run}: its backbone {ckpt['backbone']} is a Dassl folder, which records no seed or "
                           f"initialisation to rebuild the prompt before tuning; use a backbone of train_backbone.py")
        tuned, parallel = stored_prompts(ckpt, "cpu")
        initial, init_kind = initial_prompt(backbone, learner)
        moved = [n for n, t in tuned.items() if t.dim() == 2 and not n.endswith(".weight")
                 and not torch.equal(t.float(), initial[n])]             # context tensors stage 1 trained
        name = next(n for n in PICTURED if n in moved)
        table = learner.clip.token_embedding.weight.detach()
        words = {which: figures.nearest_words(p[name], table, opts.words) for which, p in (("P", tuned), ("P'", parallel))} \
            if name == "ctx" else {}                                     # words exist for the text context only
        runs.append(dict(run=run, backbone=ckpt["backbone"], learner=ckpt["learner"], data=ckpt["data"],
                         seed=ckpt["args"]["seed"], pictured=name, initial=init_kind, nearest_words=words,
                         prompts={k: p[name].tolist() for k, p in (("initial", initial), ("P", tuned),
                                                                  ("P'", parallel))},
                         tensors={n: figures.invariance(initial[n], tuned[n].float(), parallel[n].float()) for n in moved}))
    if not runs:
        raise RunError("--interpret needs DPC runs (train_dpc.py): P' exists only there")
    return dict(runs=runs, summary=figures.interpretation_summary(runs))


# ------------------------------------------------------------------------------------------------

def main(args):
    command_line.check_run_flags(args)
    if args.target is not None and not args.target.strip(" ,"):
        raise RunError(f"--target {args.target!r} names no dataset: give dataset names or the groups "
                       f"'cross-dataset', 'cross-domain'")
    if args.values is not None and not args.sweep:
        raise RunError("--values needs --sweep omega_b or --sweep omega_n")
    if args.figures and (args.target or args.ablation):
        raise RunError("--figures draws Tab. 1 (the default mode) and Fig. 6 (--sweep); drop it with --target or --ablation")
    if args.figures or args.interpret:   # before any work: the figures need matplotlib, an optional package
        figures.check_matplotlib("--figures" if args.figures else "--interpret")
    finished = checkpoints.find_runs(args.runs, args.trust_checkpoint)
    run_folder.lock_run_folder(args.out, "--out")   # one evaluate.py per --out at a time
    if args.sweep:
        out = sweep(finished, args)
        run_folder.write_json_atomic(out, os.path.join(args.out, "sweep.json"))
        for path in figures.draw_fig6(out, args.out) if args.figures else []:
            print(f"wrote figure {path}")
    elif args.target:
        out = transfer(finished, args)
        run_folder.write_json_atomic(out, os.path.join(args.out, "transfer.json"))
    elif args.ablation:
        out = ablation(finished, args)
        run_folder.write_json_atomic(out, os.path.join(args.out, "ablation.json"))
    elif args.interpret:
        out = interpret(finished, args)
        print(figures.format_interpretation(out))
        run_folder.write_json_atomic(out, os.path.join(args.out, "interpret.json"))
        for r in out["runs"]:
            for path in figures.draw_fig7(r, os.path.join(args.out, f"fig7_{r['learner']}_{r['data']}_seed{r['seed']}")):
                print(f"wrote figure {path}")
    else:
        rows = [evaluate_run(run, ckpt, args) for run, ckpt in finished]
        rows += zero_shot_rows(finished, args) if args.zero_shot else []
        if not any("base" in r for r in rows):
            raise RunError("only runs trained on all classes (Tab. 2 sources) were found: test them on other "
                           "datasets with --target")
        cells, averages = scoring.aggregate([r for r in rows if "base" in r])  # Tab. 2 sources have no base/new
        for c in cells:
            print(f"{c['learner']} {c['kind']} {c['data']}: seeds {c['seeds']}  base {c['base']:.2f}  "
                  f"new {c['new']:.2f}  HM {c['hm']:.2f}")
        templates = {r["data"]: r["template"] for r in rows if r["kind"] == "zeroshot"}
        notes = "".join(f"note: Zero-shot CLIP on {d} uses the template {t!r}\n" for d, t in templates.items())
        print("\n" + scoring.format_table(cells, averages) + notes, end="")
        out = dict(runs=rows, groups=cells, averages=averages,
                   convention="mean over seeds of base and new; H = harmonic mean of those means")
        tables = {"table.md": scoring.format_table(cells, averages, markdown=True, blocks_per_line=4)}
        if any(c["kind"] == "dept" for c in cells):   # Fig. 5: each backbone's H beside its + DePT and + DPC
            out["fig5"] = scoring.fig5_numbers(cells, averages)
            print("\n" + scoring.format_fig5(cells, averages), end="")
            tables["fig5.md"] = scoring.format_fig5(cells, averages, markdown=True, blocks_per_line=4)
        run_folder.write_json_atomic(out, os.path.join(args.out, "results.json"))
        for name, text in tables.items():
            with open(os.path.join(args.out, name), "w") as f:
                f.write(text)
        if args.figures:   # Fig. 1, Tab. 1 as a figure and Fig. 5, from the numbers just written
            for path in (figures.draw_fig1(averages, rows, args.out) + figures.draw_tab1(cells, averages, rows, args.out)
                         + (figures.draw_fig5(cells, averages, rows, args.out) if "fig5" in out else [])):
                print(f"wrote figure {path}")
    print(f"wrote {os.path.abspath(args.out)}")
    return out


def run(argv=None):
    return command_line.run_cli(main, get_args, argv)


if __name__ == "__main__":
    run()
