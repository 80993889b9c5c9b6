"""Scoring: top-1 accuracy of a learner, base-to-new and HM, and the paper's tables to lay them out in.

Both training stages end with base_to_new, and evaluate.py recomputes runs with the same functions,
so a number in results.json and a recomputed one come from one code path. Each test image is encoded
once per distinct image encoder (image_features): in this process for prompted encoders, on disk for
CLIP's plain one (docs/differences.md #15). The paper's numbers (Tab. 1, 2, 3, Fig. 6) and the
layouts evaluate.py prints are below them; figures.py draws them. This module never imports a stage file.
"""
import hashlib
import os

import PIL
import torch
import torchvision

import clip_model
import command_line
import data
import precision
import prompts
import run_folder
from run_folder import RunError, log, save_atomic


# ------------------------------------------------------------------------------------------------
# Image features, each test image encoded once per distinct image encoder (docs/differences.md #15)
# ------------------------------------------------------------------------------------------------

_MEMO: dict = {}            # in-process: feature key -> (N, E) features, oldest first

_MEMO_BYTES = 4 << 30       # what the in-process memo may hold before it forgets the oldest entries


def tensors_digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")    # the bytes, read in place
    return h.hexdigest()


def clip_digest(clip) -> str:
    """tensors_digest of the CLIP weights, remembered on the model while no tensor of it changes
    (torch counts in-place writes in `_version`; a new tensor has another data_ptr)."""
    state = clip.state_dict()
    stamp = tuple((t.data_ptr(), t._version) for t in state.values())
    if getattr(clip, "_digest", (None, None))[0] != stamp:
        clip._digest = (stamp, tensors_digest(state))
    return clip._digest[1]


def feature_key(learner, items, device: str, batch_size: int) -> tuple[str, bool]:
    """(key, persistent) of the image features of `items`: everything they depend on. The CLIP weights;
    the learner's image-side tensors if it has any (as substituted now); the test transform and the
    library versions that run it; device and precision; the batch size (it can change the last bit);
    each file's path (its bytes on disk: a name that is not UTF-8 is a surrogate-escaped str), size, mtime
    and inode. Features of CLIP's plain encoder (CoOp, zero-shot CLIP) are
    persistent (reused across runs and seeds); prompted ones live in this process only."""
    image_side = prompts.image_side_tensors(learner)
    # the device by what computes, not by its name: "cuda", "cuda:0" and "cuda:1" of one GPU model share features
    where = torch.device(device)
    device = "cpu" if where.type == "cpu" else f"{where.type} {torch.cuda.get_device_name(where)}"
    dtype = str(precision.compute_dtype(str(where)))
    h = hashlib.sha256()
    h.update(f"{clip_digest(learner.clip)} {type(learner).__name__ if image_side else 'plain'} "
             f"{tensors_digest(image_side) if image_side else ''} "
             f"{data.test_transform(learner.clip.visual.input_resolution)} torch {torch.__version__} "
             f"torchvision {torchvision.__version__} PIL {PIL.__version__} {device} {dtype} {batch_size}".encode())
    for item in items:
        st = os.stat(item.path)
        h.update(b"\n" + os.fsencode(item.path) + f" {st.st_size} {st.st_mtime_ns} {st.st_ino}".encode())
    return h.hexdigest(), not image_side


_WARNED: dict = {}          # cache folder -> the run (its log file) already warned that it cannot write there


def warn_once(cache: str, message: str) -> None:
    """One warning per unusable cache folder and run (docs/faults.md): a run scores base and new,
    evaluate.py many runs, each a failed write. A run is known by the log file run_folder.start_run opens
    for it, so several runs in one process (tests) each warn once; evaluate.py, which starts
    no run, warns once."""
    if cache in _WARNED and _WARNED[cache] is run_folder._LOG:
        return
    _WARNED[cache] = run_folder._LOG
    log(message)


def encode_images(learner, items, device, workers, batch_size) -> list:
    """f(V) of every item, batch by batch, in the learner's current state: [(B, E), ...]."""
    test_images = data.ImageDataset(items, data.test_transform(learner.clip.visual.input_resolution))
    loader = data.make_loader(test_images, batch_size, False, workers, pin=device.startswith("cuda"))
    return [learner.encode_image(images.to(device, non_blocking=True)) for images, _, _ in loader]


def cached_features_fit(stored, n_items: int, batch_size: int, width: int) -> bool:
    """A cache file holds what encode_images returns for these items: [(B, E), ...] in batches of
    batch_size, E = CLIP's embedding width, dense tensors inside their storage. Anything else is a miss."""
    sizes = [min(batch_size, n_items - i) for i in range(0, n_items, batch_size)]
    return isinstance(stored, list) and len(stored) == len(sizes) and all(
        clip_model.tensor_problem(f) is None and f.is_floating_point() and tuple(f.shape) == (b, width)
        for f, b in zip(stored, sizes))


def image_features(learner, items, device, workers, batch_size, cache) -> list:
    """encode_images, or the same tensors from an earlier pass: in this process (sweeps, transfer, base
    and new of several runs), or from disk under `cache` for CLIP's plain encoder (a DPC run of a CoOp
    backbone, other seeds). Stored in the encoder's own dtype (fp32 on CPU, bf16/fp16 under GPU autocast):
    a narrower copy would change the logits, and a cached result must equal an uncached one bitwise."""
    if cache is None or cache == "off":
        return encode_images(learner, items, device, workers, batch_size)
    key, persistent = feature_key(learner, items, device, batch_size)
    if key in _MEMO:
        _MEMO[key] = _MEMO.pop(key)   # most recently used last
        return [f.to(device) for f in _MEMO[key]]
    path = os.path.join(cache, key[:2], key + ".pt")
    features = None
    if persistent and os.path.isfile(path) and clip_model.zip_problem(path) is None:   # else a miss, rewritten
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if cached_features_fit(stored, len(items), batch_size, learner.clip.text_projection.shape[1]):
                features = [f.to(device) for f in stored]
        except Exception:   # a damaged cache file is a miss, then rewritten
            features = None
    if features is None:
        features = encode_images(learner, items, device, workers, batch_size)
        if persistent:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                run_folder.remove_stale_temps(os.path.dirname(path))
                save_atomic([f.cpu() for f in features], path)
            except OSError as e:   # a read-only cache costs time, never the run
                warn_once(cache, f"warning: cannot write the feature cache {path} ({e.strerror}); "
                                 f"pass --feature-cache off")
    _MEMO[key] = [f.cpu() for f in features]
    while sum(f.numel() * f.element_size() for v in _MEMO.values() for f in v) > _MEMO_BYTES and len(_MEMO) > 1:
        _MEMO.pop(next(iter(_MEMO)))
    return features


# ------------------------------------------------------------------------------------------------
# Accuracy, base-to-new, Dassl's result block
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(learner, items, classnames, device, workers=0, prompt=None, batch_size=100, cache=None) -> float:
    """Top-1 accuracy (%) on `items` among `classnames`; text features are computed once, image
    features come from image_features (`cache`: its folder, or None / "off" to always encode).

    `prompt` (optional) replaces the learner's prompt tensors (DPC's base or new prompt)."""
    prompts.check_classnames(learner, classnames)
    labels = torch.tensor([item.label for item in items])
    correct = 0
    with prompts.substitute(learner, prompt or {}), precision.autocast(device):
        text = learner.encode_text(classnames)                                  # (C, E)
        features = image_features(learner, items, device, workers, batch_size, cache)
        for i, image in enumerate(features):                                    # (B, E) each
            if isinstance(learner, prompts.DePT):   # DePT: s fused with its head on the classes it knows
                logits = learner.logits(image, text, classnames)                 # (B, C)
            else:
                logits = prompts.cosine_logits(image, text, 1.0)                 # (B, C)
            correct += (logits.argmax(dim=-1).cpu() == labels[i * batch_size:(i + 1) * batch_size]).sum().item()
    return 100.0 * correct / max(len(items), 1)


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def base_to_new(learner, splits, device, workers=0, base_prompt=None, new_prompt=None, subsample="base",
                cache=None) -> dict:
    """Base accuracy: base test images among base classes (with base_prompt); new likewise.
    A run trained on all classes (Tab. 2's source) has one accuracy: all test images, all classes."""
    def acc(split, prompt):
        items = splits[split]["test"]
        return accuracy(learner, items, data.classnames_of(items), device, workers, prompt, cache=cache)
    if subsample == "all":
        return dict(all=acc("all", base_prompt))
    base, new = acc("base", base_prompt), acc("new", new_prompt)
    return dict(base=base, new=new, hm=harmonic_mean(base, new))


def log_results(results: dict, title: str):
    """Dassl's result block per split (parse_test_res.py greps '* accuracy: X%'), then one summary line."""
    for split in ("base", "new", "all"):
        if split in results:
            log(f"=> result ({title}, {split} classes)\n* accuracy: {results[split]:.2f}%")
    if "all" in results:
        log(f"{title}: all classes {results['all']:.2f}")
    else:
        log(f"{title}: base {results['base']:.2f}  new {results['new']:.2f}  HM {results['hm']:.2f}")


def mean(xs) -> float:
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------------------
# Seeds -> datasets -> the cells of Tab. 1 (and Tab. 3), and Tab. 2's columns
# ------------------------------------------------------------------------------------------------

def check_one_experiment(learner: str, kind: str, name: str, rows: list[dict]) -> None:
    """A row is the mean over seeds of ONE experiment: the seeds are distinct and every setting that changes
    the numbers is equal (command_line.setting_differences: shots, epochs, lr, initialisation, ω, K, ..., and the
    CLIP weights by content). Else one line naming the setting and both values."""
    seeds = [r["seed"] for r in rows]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        runs = [r["run"] for r in rows if r["seed"] == twice[0]]
        raise RunError(f"{learner} {kind} {name}: seed {twice[0]} comes twice ({', '.join(map(str, runs))}): a row "
                       f"averages distinct seeds of one experiment; evaluate each experiment's folders in their own call")
    for r in rows[1:]:
        differ = command_line.setting_differences(rows[0]["args"], r["args"]) if "args" in r and "args" in rows[0] else []
        if differ:
            raise RunError(f"{learner} {kind} {name}: seed {rows[0]['seed']} ({rows[0]['run']}) and seed {r['seed']} "
                           f"({r['run']}) differ in {'; '.join(differ[:3])}: a row averages the seeds of one experiment; "
                           f"evaluate each setting's run folders in their own call (e.g. evaluate.py tab4/k4)")


def aggregate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Groups (learner, row, dataset): mean base and mean new over seeds, H = HM of the two means (the
    CoCoOp/MaPLe convention, not the mean of per-seed H). Averages: the same over the datasets present."""
    groups = {}
    for r in rows:
        groups.setdefault((r["learner"], r["kind"], r["data"]), []).append(r)
    cells = []
    for (learner, kind, name), rs in groups.items():
        seeds = [r["seed"] for r in rs]
        check_one_experiment(learner, kind, name, rs)
        base, new = mean([r["base"] for r in rs]), mean([r["new"] for r in rs])
        cells.append(dict(learner=learner, kind=kind, data=name, seeds=seeds, base=base, new=new,
                          hm=harmonic_mean(base, new)))
    averages = []
    for learner, kind in dict.fromkeys((c["learner"], c["kind"]) for c in cells):
        cs = [c for c in cells if (c["learner"], c["kind"]) == (learner, kind)]
        base, new = mean([c["base"] for c in cs]), mean([c["new"] for c in cs])
        averages.append(dict(learner=learner, kind=kind, data="average", datasets=[c["data"] for c in cs],
                             base=base, new=new, hm=harmonic_mean(base, new)))
    return cells, averages


def transfer_summary(rows: list[dict]) -> list[dict]:
    """Per (learner, row, source): every target's accuracy averaged over seeds, then Tab. 2's three columns."""
    per = {}
    for r in rows:
        per.setdefault((r["learner"], r["kind"], r["source"]), {}).setdefault(r["target"], []).append(r["accuracy"])
    summary = []
    for (learner, kind, source), accs in per.items():
        accs = {t: mean(v) for t, v in accs.items()}
        dataset = [t for t in accs if t != source and t not in data.CROSS_DOMAIN]
        domain = [t for t in accs if t != source and t in data.CROSS_DOMAIN]
        summary.append(dict(learner=learner, kind=kind, source=source, accuracy=accs, source_accuracy=accs[source],
                            cross_dataset=mean([accs[t] for t in dataset]) if dataset else None,
                            cross_domain=mean([accs[t] for t in domain]) if domain else None,
                            cross_dataset_targets=dataset, cross_domain_targets=domain))
    return summary


# ------------------------------------------------------------------------------------------------
# The paper's numbers (Tab. 1, ViT-B/16). H is computed, not stored: HM of the rounded averages can
# differ from the printed H by 0.01 (PromptSRC 78.88 vs 78.87)
# ------------------------------------------------------------------------------------------------

PAPER_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                  "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")  # Tab. 1 column order

_BASE = {  # learner: (backbone base, + DPC base), in PAPER_DATASETS order
    "coop": ((76.41, 97.55, 95.06, 75.69, 96.96, 90.49, 37.33, 80.99, 80.09, 87.60, 83.66),
             (77.72, 98.58, 95.80, 81.13, 98.86, 91.15, 45.56, 82.81, 84.61, 93.40, 87.02)),
    "maple": ((76.91, 97.98, 95.23, 77.63, 97.03, 89.85, 40.82, 81.54, 82.18, 94.96, 84.55),
              (77.94, 98.64, 95.82, 79.56, 98.20, 91.35, 49.78, 82.02, 85.48, 98.33, 88.14)),
    "promptsrc": ((77.28, 97.93, 95.41, 76.34, 97.06, 90.83, 39.20, 82.28, 83.45, 92.84, 85.28),
                  (78.48, 98.90, 96.13, 82.28, 97.44, 91.40, 46.74, 83.63, 86.88, 96.25, 88.99)),
    "promptkd": ((80.82, 98.90, 96.44, 82.41, 99.24, 92.59, 48.80, 83.53, 85.42, 97.20, 90.12),
                 (80.25, 98.77, 96.07, 84.17, 98.96, 92.41, 52.94, 83.28, 87.73, 98.29, 90.18)),
}

_NEW = {  # new accuracy, the same for the backbone and + DPC in every cell (ω_n ≈ 0)
    "coop": (68.85, 94.65, 97.60, 70.14, 68.37, 91.47, 24.24, 74.10, 49.88, 51.62, 66.31),
    "maple": (67.96, 94.50, 97.67, 71.21, 72.67, 90.47, 34.01, 75.93, 55.63, 72.19, 74.15),
    "promptsrc": (70.72, 94.21, 97.30, 74.98, 73.19, 91.58, 35.33, 78.08, 54.31, 74.73, 78.13),
    "promptkd": (74.66, 96.29, 97.99, 82.80, 82.91, 93.73, 41.75, 81.07, 71.01, 82.35, 81.50),
}

_AVERAGE = {"coop": (81.98, 85.15, 68.84), "maple": (83.52, 85.93, 73.31),  # base, + DPC base, new
            "promptsrc": (83.45, 86.10, 74.78), "promptkd": (86.86, 87.55, 80.55)}

PAPER = {(learner, row): {**{d: (_BASE[learner][i][k], _NEW[learner][k]) for k, d in enumerate(PAPER_DATASETS)},
                          "average": (_AVERAGE[learner][i], _AVERAGE[learner][2])}
         for learner in _BASE for i, row in enumerate(("backbone", "dpc"))}

# Fig. 6, CoOp, average over 11 datasets; values with ~ are read off the plot (the paper's Fig. 6 and its poster).
PAPER_FIG6 = {"omega_b": {0: 81.98, 0.1: 84.7, 0.2: 85.15, 0.3: 85.1, 0.5: 84.85, 1.0: 84.28},
              "omega_n": {0: 68.84, 0.01: 68.73, 0.02: 68.65, 0.05: 68.18, 0.1: 67.35, 0.2: 65.88}}

# Tab. 2 of the paper (ViT-B/16, ImageNet source): Source, Avg. of cross-dataset, Avg. of cross-domain.
PAPER_TAB2 = {("coop", "backbone"): (71.25, 64.98, 60.31), ("coop", "dpc"): (71.80, 64.98, 60.31),
              ("maple", "backbone"): (70.11, 64.79, 60.11), ("maple", "dpc"): (71.36, 64.79, 60.11),
              ("promptsrc", "backbone"): (70.65, 65.64, 60.58), ("promptsrc", "dpc"): (71.42, 65.64, 60.58),
              ("promptkd", "backbone"): (72.42, 70.77, 71.47), ("promptkd", "dpc"): (74.43, 70.77, 71.47)}

PAPER_TAB2_COLUMNS = {f"{learner}/{kind}": dict(zip(("source", "cross_dataset", "cross_domain"), v))
                      for (learner, kind), v in PAPER_TAB2.items()}

ABLATION_ROWS = ("backbone", "(1) TS", "(2) TS + DHNO", "(3) TS + WE", "(4) TS + WE + DE", "(5) TS + DHNO + WE + DE")

# The cells of Tab. 3 that the paper's text attributes (avg over 11 datasets, CoOp); None where it does not.
PAPER_TAB3 = {"backbone": (81.98, 68.84, 74.84), "(1) TS": (82.69, 68.39, None), "(2) TS + DHNO": (84.28, 64.12, None),
              "(3) TS + WE": (None, 65.88, None), "(4) TS + WE + DE": (82.23, 68.84, 74.94),
              "(5) TS + DHNO + WE + DE": (85.15, 68.84, 76.13)}


# ------------------------------------------------------------------------------------------------
# Tables laid out as the paper's: Tab. 1 (format_table), Tab. 2 (format_transfer), Tab. 3 (format_ablation)
# ------------------------------------------------------------------------------------------------

NAMES = {"coop": "CoOp", "maple": "MaPLe", "promptsrc": "PromptSRC", "promptkd": "PromptKD"}


KINDS = ("backbone", "dept", "dpc")   # a learner's rows in Tab. 1's order: the backbone, + DePT (Fig. 5), + DPC
KIND_NAMES = {"backbone": "backbone", "dept": "+ DePT", "dpc": "+ DPC"}


def method(learner: str, kind: str) -> str:
    return NAMES.get(learner, learner) + {"dpc": " + DPC", "dept": " + DePT"}.get(kind, "")


def paper_cell(learner: str, kind: str, name: str, datasets=None):
    """(base, new, H) the paper reports, or None. The average is the paper's when we cover its 11
    datasets, else the mean of its numbers over the same datasets (None if one has no paper number)."""
    table = PAPER.get((learner, kind), {})
    if name == "average" and set(datasets) != set(PAPER_DATASETS):
        if not all(d in table for d in datasets):
            return None
        base, new = mean([table[d][0] for d in datasets]), mean([table[d][1] for d in datasets])
    elif name in table:
        base, new = table[name]
    else:
        return None
    return base, new, harmonic_mean(base, new)


def format_table(cells: list[dict], averages: list[dict], markdown=False, blocks_per_line=3) -> str:
    """Tab. 1's layout: a (Base, New, H) block for the average and per dataset, a row per learner and a
    "+ DPC" row; each of our numbers is followed by the paper's, or "–" where it has none (no paper
    column at all when none of the datasets is in the paper)."""
    by_key = {(c["learner"], c["kind"], c["data"]): c for c in cells + averages}
    order = {d: i for i, d in enumerate(PAPER_DATASETS)}
    names = sorted({c["data"] for c in cells}, key=lambda d: (order.get(d, len(order)), d))
    n = max(len(a["datasets"]) for a in averages)
    titles = {"average": f"Avg over {n} dataset{'s' * (n > 1)}",
              **{d: data.DATASETS[d].display_name if d in data.DATASETS else d for d in names}}
    learners = {name: i for i, name in enumerate(prompts.LEARNERS)}
    rows = sorted({(a["learner"], a["kind"]) for a in averages},
                  key=lambda r: (-1 if r[1] == "zeroshot" else learners.get(r[0], 99), r))  # zero-shot first
    columns = names if len(names) == 1 else ["average"] + names  # one dataset: its block is the average
    with_paper = any(d in PAPER_DATASETS for d in names)  # e.g. the toy world has no paper numbers at all
    lines = []
    for start in range(0, len(columns), blocks_per_line):
        chunk = columns[start:start + blocks_per_line]
        table = [["Method"] + [t for d in chunk for t in (titles[d], "", "")],
                 [""] + ["Base", "New", "H"] * len(chunk)]
        for learner, kind in rows:
            # "+ DPC" (and "+ DePT") under its backbone's row, as in Tab. 1; the full name when that row is missing
            row = [method("", kind).strip() if kind in ("dpc", "dept") and (learner, "backbone") in rows else method(learner, kind)]
            for d in chunk:
                ours = by_key.get((learner, kind, d))
                paper = paper_cell(learner, kind, d, by_key[learner, kind, "average"]["datasets"])
                row += [("–" if ours is None else f"{ours[m]:.2f}") +
                        (f" (paper {'–' if paper is None else f'{paper[i]:.2f}'})" if with_paper else "")
                        for i, m in enumerate(("base", "new", "hm"))]
            table.append(row)
        if markdown:  # one header row: "<dataset> Base | New | H"
            header = ["Method"] + [f"{titles[d]} Base" if m == "Base" else m
                                   for d in chunk for m in ("Base", "New", "H")]
            lines += ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + table[2:]] + [""]
        else:
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in table] + [""]
    lines += [f"note: the {method(a['learner'], a['kind'])} average is over {', '.join(a['datasets'])} only"
              for a in averages if len(a["datasets"]) != n]
    if with_paper and any(set(a["datasets"]) != set(PAPER_DATASETS) for a in averages):
        lines.append("note: a paper average beside ours is the paper's mean over the same datasets")
    return "\n".join(lines).rstrip() + "\n"


def fig5_numbers(cells: list[dict], averages: list[dict]) -> dict:
    """Fig. 5's numbers (§4.2, "Compare with another plug-and-play method"): per learner with a + DePT run,
    the H of its backbone, + DePT and + DPC, over the datasets (scoring.aggregate's averages) and on each
    (its cells): H of the seed-mean base and new, as Tab. 1's; None where that run is missing. Learners
    without a DePT run (PromptKD: DePT is not defined for it) are listed in left_out. The paper's Fig. 5
    is a picture only (its table, Sup. Mat. B.7, is not available), so there are no paper numbers."""
    by_key = {(c["learner"], c["kind"], c["data"]): c for c in cells + averages}
    learners = {name: i for i, name in enumerate(prompts.LEARNERS)}
    order = {d: i for i, d in enumerate(PAPER_DATASETS)}
    with_dept = sorted({a["learner"] for a in averages if a["kind"] == "dept"}, key=lambda x: (learners.get(x, 99), x))
    if not with_dept:
        raise run_folder.RunError("Fig. 5 needs + DePT runs (train_backbone.py --dept); none were given")
    names = sorted({c["data"] for c in cells if c["learner"] in with_dept and c["kind"] in KINDS},
                   key=lambda d: (order.get(d, len(order)), d))

    def h(learner, kind, name):
        cell = by_key.get((learner, kind, name))
        return None if cell is None else cell["hm"]
    rows = [dict(learner=x, method=method(x, "backbone"),
                 average={k: h(x, k, "average") for k in KINDS},
                 average_over={k: by_key[x, k, "average"]["datasets"] if (x, k, "average") in by_key else [] for k in KINDS},
                 per_dataset={d: {k: h(x, k, d) for k in KINDS} for d in names}) for x in with_dept]
    left_out = sorted({a["learner"] for a in averages if a["kind"] in KINDS} - set(with_dept),
                      key=lambda x: (learners.get(x, 99), x))
    return dict(figure="Fig. 5", metric="H (%)", kinds=list(KINDS), datasets=names, rows=rows, left_out=left_out)


def format_fig5(cells: list[dict], averages: list[dict], markdown=False, blocks_per_line=3) -> str:
    """Fig. 5 as a table: a row per learner with a + DePT run, an (backbone, + DePT, + DPC) block of H for
    the average over datasets and for each dataset (fig5_numbers), "–" where a run is missing."""
    numbers = fig5_numbers(cells, averages)
    names, kinds = numbers["datasets"], numbers["kinds"]
    columns = names if len(names) == 1 else ["average"] + names   # one dataset: its block is the average
    titles = {"average": f"Avg over {len(names)} datasets", **{d: dataset_title(d) for d in names}}
    heads = [KIND_NAMES[k] for k in kinds]
    lines = ["Fig. 5: H of each backbone, + DePT, + DPC", ""]
    for start in range(0, len(columns), blocks_per_line):
        chunk = columns[start:start + blocks_per_line]
        table = [["Method"] + [t for d in chunk for t in (titles[d], "", "")], [""] + heads * len(chunk)]
        for r in numbers["rows"]:
            values = [(r["average"] if d == "average" else r["per_dataset"][d])[k] for d in chunk for k in kinds]
            table.append([r["method"]] + ["–" if v is None else f"{v:.2f}" for v in values])
        if markdown:  # one header row: "<dataset> backbone | + DePT | + DPC"
            header = ["Method"] + [f"{titles[d]} {m}" if i == 0 else m for d in chunk for i, m in enumerate(heads)]
            lines += ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + table[2:]] + [""]
        else:   # a block's title spans its three columns, the last widened if it is longer
            widths = [max(len(r[i]) for r in table[1 if i else 0:]) for i in range(len(table[0]))]
            for b, d in enumerate(chunk):
                widths[3 * b + 3] += max(0, len(titles[d]) - sum(widths[3 * b + 1:3 * b + 4]) - 4)
            spans = [widths[0]] + [sum(widths[3 * b + 1:3 * b + 4]) + 4 for b in range(len(chunk))]
            lines += ["  ".join(x.ljust(w) for x, w in zip(["Method"] + [titles[d] for d in chunk], spans)).rstrip()]
            lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in table[1:]] + [""]
    lines += [f"note: the {method(r['learner'], k)} average is over {', '.join(r['average_over'][k])} only"
              for r in numbers["rows"] for k in kinds if r["average_over"][k] and set(r["average_over"][k]) != set(names)]
    if numbers["left_out"]:
        lines.append(f"note: no + DePT run of {', '.join(NAMES.get(x, x) for x in numbers['left_out'])}: not in Fig. 5"
                     + (" (DePT is not defined for PromptKD)" if "promptkd" in numbers["left_out"] else ""))
    lines.append("note: H of the seed-mean base and new, as Tab. 1's; no paper numbers beside ours: the paper's "
                 "Fig. 5 is a picture (its table is Sup. Mat. B.7, not available here)")
    return "\n".join(lines).rstrip() + "\n"


def format_transfer(summary: list[dict]) -> str:
    """Tab. 2's layout: Method | Source | Avg. of cross-dataset | Avg. of cross-domain, ours (paper)."""
    learners = {name: i for i, name in enumerate(prompts.LEARNERS)}
    table = [["Method", "Source", "Avg. of cross-dataset", "Avg. of cross-domain"]]
    for s in sorted(summary, key=lambda s: (s["source"], learners.get(s["learner"], 99), s["kind"])):
        paper = PAPER_TAB2.get((s["learner"], s["kind"])) if s["source"] == "imagenet" else None
        cells = []
        for i, (value, targets) in enumerate(((s["source_accuracy"], None), (s["cross_dataset"], s["cross_dataset_targets"]),
                                              (s["cross_domain"], s["cross_domain_targets"]))):
            text = "–" if value is None else f"{value:.2f}"
            if targets is not None and value is not None and len(targets) != (10 if i == 1 else 4):
                text += f" [{len(targets)} of {10 if i == 1 else 4}]"
            cells.append(text + f" (paper {'–' if paper is None else f'{paper[i]:.2f}'})")
        name = f"{method(s['learner'], s['kind'])} [{s['source']}]"
        table.append([name] + cells)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines + ["note: [k of n] = a mean over the targets given, not all of Tab. 2's; paper numbers "
                              "are for an ImageNet source"]) + "\n"


def format_ablation(cells: list[dict], averages: list[dict]) -> str:
    """Tab. 3's layout: a row per component set, Base / New / H over the datasets present, ours (paper)."""
    n = max(len(a["datasets"]) for a in averages)
    table = [["Row", f"Base (avg over {n} dataset{'s' * (n > 1)})", "New", "H"]]
    by_row = {a["kind"]: a for a in averages}
    for row in ABLATION_ROWS:
        ours, paper = by_row.get(row), PAPER_TAB3[row]
        table.append([row] + [("–" if ours is None else f"{ours[m]:.2f}") +
                              f" (paper {'–' if paper[i] is None else f'{paper[i]:.2f}'})"
                              for i, m in enumerate(("base", "new", "hm"))])
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in table]
    lines += [f"note: {a['kind']} is averaged over {', '.join(a['datasets'])} only" for a in averages
              if len(a["datasets"]) != n]
    return "\n".join(lines + ["note: paper numbers are CoOp's average over 11 datasets; '–' where its text "
                              "does not attribute the cell"]) + "\n"


def dataset_title(name: str) -> str:
    return data.DATASETS[name].display_name if name in data.DATASETS else name
