"""Stage 1 of DPC: tune a prompt learner (CoOp, MaPLe, PromptSRC, PromptKD) on the base classes.

DPC paper §3.2: "we first execute moderate fine-tuning on the original prompt vector in prompt
tuning backbone model, entirely adhering to the baseline settings to obtain the tuned prompt P".
This script is that baseline: the learner's own loss and schedule, then base-to-new evaluation
(base accuracy among base classes, new accuracy among new classes, HM) — the "backbone" row
that "+ DPC" is compared with in Tab. 1.

    python train_backbone.py --learner coop --data eurosat --root /data --seed 1
    python train_backbone.py --learner coop --data synthetic --clip tiny --epochs 2   # offline smoke run

The run folder (default output/<data>/<learner>/seed<seed>) holds args.json, log.txt,
checkpoint.pt (trainable tensors + optimiser + class names + CLIP name, written atomically every
epoch) and results.json. `--resume` continues an interrupted run from its last finished epoch.
"""
import argparse
import errno
import glob
import hashlib
import json
import math
import os
import pickle
import platform
import re
import shutil
import sys
import time

import PIL
import torch
import torchvision

import clip_model
import data
import prompts

LAST_BACKBONE = os.path.join("output", "last_backbone.txt")  # where train_dpc.py finds the latest run
# PromptKD's teacher as the original code trains it (PromptSRC config vit_l14_c2_ep20_batch8_4+4ctx,
# 16-shot base classes; DECISIONS #8): `train_backbone.py --learner promptsrc` with these flags.
PROMPTKD_TEACHER_RECIPE = dict(learner="promptsrc", clip="ViT-L/14", lr=0.005, batch_size=8, epochs=20, shots=16,
                               subsample="base")


class RunError(ValueError):
    """A bad flag, run folder or checkpoint: one line saying what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose bad-flag message is one line (no usage block), like every other input error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def get_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--learner", required=True, choices=list(prompts.LEARNERS), help="prompt learner (paper §4.1)")
    p.add_argument("--data", required=True,
                   help=f"dataset: one of {', '.join(data.DATASETS)}, a folder name under --root in the "
                        f"ImageFolder layout, 'toy' (the toy world, README) or 'synthetic' (random smoke data); the last two "
                        f"are generated under --root if missing")
    p.add_argument("--root", default="data", help="folder holding the datasets")
    p.add_argument("--shots", type=int, default=None,
                   help="images per class (16: base-to-new protocol; PromptKD: 0 = the full train split, all classes)")
    p.add_argument("--seed", type=int, default=1, help="run seed (the protocol averages seeds 1, 2, 3)")
    p.add_argument("--subsample", default="base", choices=("base", "all"),
                   help="train on the base classes (base-to-new, Tab. 1) or all classes (cross-dataset source, Tab. 2)")
    p.add_argument("--clip", default="ViT-B/16", help="CLIP weights: ViT-B/16 (~/.cache/clip), a .pt path, 'toy' (assets/toy_clip.pt, "
                                                      "pretrained on the toy world) or 'tiny' (random, for smoke runs)")
    p.add_argument("--epochs", type=int, default=None, help="default per learner: " + "; ".join(
        f"{k} {v.DEFAULTS['epochs']}" for k, v in prompts.LEARNERS.items()))
    p.add_argument("--batch-size", type=int, default=None, help="default 32 for every learner (DPC paper §4.1)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate; default per learner: " + "; ".join(
        f"{k} {v.DEFAULTS['lr']} ({v.DEFAULTS['source']})" for k, v in prompts.LEARNERS.items()))
    p.add_argument("--n-ctx", type=int, default=None, help="text context tokens (default: CoOp 4, MaPLe 2, PromptSRC 4)")
    p.add_argument("--ctx-init", default=None, help="init phrase (default 'a photo of a'; '' = random init)")
    p.add_argument("--teacher", default=None, help="PromptKD: a promptsrc run trained as the original teacher (README: "
                   "ViT-L/14, lr 0.005, batch 8, 20 epochs) or a released Dassl folder teacher_model/<Dataset>")
    p.add_argument("--teacher-clip", default="ViT-L/14", help="CLIP of a Dassl --teacher folder (our runs record their own)")
    p.add_argument("--continue-from", default=None,
                   help="Tab. 3 row (1), TS: start from this finished run's prompt and optimiser state and tune it for "
                        "another --epochs with the same loss and a restarted schedule")
    p.add_argument("--kd-weight", type=float, default=None, help="PromptKD: 1000, or 200 for fgvc_aircraft, oxford_flowers, dtd")
    p.add_argument("--select-best-on-base-test", action="store_true",
                   help="keep the epoch with the best base TEST accuracy (PromptKD's original selection; "
                        "test-set selection, so off by default: the last epoch is reported, DECISIONS #8)")
    p.add_argument("--gpa-mean", type=float, default=15.0, help="PromptSRC Gaussian prompt aggregation mean (epochs)")
    p.add_argument("--gpa-std", type=float, default=1.0, help="PromptSRC Gaussian prompt aggregation std (epochs)")
    p.add_argument("--output-dir", default=None, help="run folder (default output/<data>/<learner>/seed<seed>)")
    add_run_flags(p)
    args = p.parse_args(argv)
    defaults = prompts.LEARNERS[args.learner].DEFAULTS
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    args.lr = defaults["lr"] if args.lr is None else args.lr
    if args.shots is None:
        args.shots = 0 if args.learner == "promptkd" else 16
    if args.kd_weight is None and args.learner == "promptkd":
        args.kd_weight = 200.0 if args.data in prompts.KD_WEIGHT_200 else 1000.0
    args.output_dir = args.output_dir or os.path.join("output", args.data, args.learner + "_ts" * bool(args.continue_from),
                                                      f"seed{args.seed}")
    args.root = os.path.abspath(args.root)  # runs are re-evaluated from other folders
    args.teacher = args.teacher and os.path.abspath(args.teacher)
    args.clip, args.teacher_clip = clip_path(args.clip), clip_path(args.teacher_clip)
    args.continue_from = args.continue_from and os.path.abspath(args.continue_from)
    check_positive(args, "epochs", "batch_size", "lr")
    check_shots(args.shots)
    check_run_flags(args)
    if args.n_ctx is not None and args.n_ctx < 1:
        raise RunError(f"--n-ctx must be at least 1, got {args.n_ctx}")
    if args.learner == "promptsrc":
        check_positive(args, "gpa_std")
        if not math.isfinite(args.gpa_mean):
            raise RunError(f"--gpa-mean must be finite, got {args.gpa_mean}")
    if args.learner == "promptkd":
        check_positive(args, "kd_weight")
        if args.batch_size < 2:
            raise RunError(f"--batch-size {args.batch_size}: PromptKD's projector has BatchNorm, which needs at "
                           f"least 2 images a batch")
    return args


def add_run_flags(p):
    """Flags every training script shares: run-folder handling, data loading, device."""
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="start over even if --output-dir holds a run")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0 = in the main process); "
                   "train_dpc.py also renders its negatives on this many threads. On <= 2 cores use 0")
    p.add_argument("--print-every", type=int, default=20, help="iterations between progress lines")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_feature_cache_flag(p)
    add_trust_flag(p)


def add_trust_flag(p):
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle checkpoints fully: RUNS CODE FROM THE FILE; only for files you trust (by default "
                        "they are read as plain data, README 'Loading checkpoints safely')")


def check_shots(shots: int) -> None:
    if shots < 0:
        raise RunError(f"--shots must be 0 (all images) or positive, got {shots}")


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if not (value > 0 and value < torch.finfo(torch.float32).max):   # finite in fp32, where it is used
            raise RunError(f"--{name.replace('_', '-')} must be positive and finite (in fp32), got {value}")


def check_run_flags(args) -> None:
    """The flags every script reads, checked before anything is written."""
    if args.workers < 0:
        raise RunError(f"--workers must be 0 (load in the main process) or positive, got {args.workers}")
    if getattr(args, "print_every", 1) < 1:
        raise RunError(f"--print-every must be at least 1, got {args.print_every}")
    if getattr(args, "seed", None) is not None and not -2 ** 63 <= args.seed < 2 ** 63:
        raise RunError(f"--seed must fit in 64 bits, got {args.seed}")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", args.device)
    if args.device != "cpu" and not (cuda and int(cuda.group(1) or 0) < torch.cuda.device_count()):
        raise RunError(f"--device {args.device} is not available here: pass --device cpu" +
                       (" or cuda[:N]" if torch.cuda.is_available() else " (no CUDA GPU is visible)"))
    if getattr(args, "feature_cache", None) == "":
        raise RunError("--feature-cache '' names no folder: give a folder, or 'off'")


def check_not_a_source(output_dir: str, **sources) -> None:
    """--output-dir must not be a run this one reads (--backbone, --teacher, --continue-from):
    writing there, even with --overwrite, would destroy the run it starts from."""
    for flag, folder in sources.items():
        if folder and os.path.realpath(folder) == os.path.realpath(output_dir):
            raise RunError(f"--output-dir {output_dir} is the --{flag.replace('_', '-')} run itself: writing there "
                           f"would destroy it; choose another --output-dir")


# ------------------------------------------------------------------------------------------------
# Run folder, logging, checkpoints (shared with train_dpc.py and evaluate.py)
# ------------------------------------------------------------------------------------------------

def check_run_folder(args, kind: str = "backbone"):
    """Before anything is written: the unfinished checkpoint to resume from, or None.
    A finished run is never touched without --overwrite."""
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.exists(path) or args.overwrite:
        return None
    previous = read_checkpoint(path, args.trust_checkpoint)
    if previous["kind"] != kind:
        raise RunError(f"{args.output_dir} holds a {previous['kind']} run of {SCRIPT[previous['kind']]}, not a "
                       f"{kind} run: choose another --output-dir")
    if previous["finished"]:
        raise RunError(f"{args.output_dir} already holds a finished run: re-evaluate it with evaluate.py, "
                       f"or pass --overwrite to train again (or another --output-dir)")
    if not args.resume:
        raise RunError(f"{args.output_dir} holds an unfinished run (epoch {previous['epoch']}/"
                       f"{previous['args'].get('epochs')}): pass --resume to continue or --overwrite to start over")
    mine = dict(learner=args.learner, data=args.data, clip=getattr(args, "clip", previous["clip"]))
    theirs = {k: previous.get(k) for k in mine}
    if mine != theirs:
        raise RunError(f"--resume: {args.output_dir} holds a run of {theirs}, this command asks for {mine}; "
                       f"use the run's own flags or another --output-dir")
    return previous


def check_disk(folder: str, tensors) -> None:
    """Before the run folder is made: room for a checkpoint (state + optimiser + the temp copy of an
    atomic write) on the disk `folder` will be on."""
    need = 3 * sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)       # the nearest folder that exists (a file's parent, too)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise RunError(f"only {free >> 20} MB free in {folder}, checkpoints need about {need >> 20} MB: "
                       f"free some space or choose another --output-dir")


def start_run(args):
    """Create the run folder, dump args.json, tee log() to log.txt (after every input was checked)."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    except OSError as e:
        raise RunError(f"cannot write to {args.output_dir}: {e.strerror}; choose a writable --output-dir")
    global _LOG
    if _LOG is not None:  # a previous run in this process (tests, evaluate.py)
        _LOG.close()
    _LOG = open(os.path.join(args.output_dir, "log.txt"), "a")
    log(f"{os.path.basename(sys.argv[0])} {json.dumps(vars(args))}\npython {platform.python_version()}, "
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))


_LOG = None


def log(message: str):
    print(message, flush=True)
    if _LOG is not None:
        _LOG.write(message + "\n")
        _LOG.flush()


def save_atomic(obj, path: str):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint. The temp
    name is the process's own, so runs writing the same file (a shared feature cache) never mix."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:   # torch's zip writer reports a failed open or write (read-only, disk full) so
            reason = str(e).strip().rsplit(": ", 1)[-1]   # "... open file failed with strerror: Read-only file system"
            raise OSError(errno.EIO, f"cannot write ({reason})", path) from e
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Reading checkpoints without running code from them (README: "Loading checkpoints safely")
# ------------------------------------------------------------------------------------------------

TRUST_HINT = "if you trust the file, pass --trust-checkpoint (it runs code from the file)"


class Inert:
    """Stands in for an object a Dassl checkpoint pickles but no stage ever needs: the optimiser and
    LR scheduler objects (Dassl's warm-up scheduler state pickles its successor scheduler, and with it
    the optimiser). Nothing of the file is ever called: creating one ignores its arguments, and the
    pickled state is kept as plain data."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.pickled_state = state


def _plain_dict(*args):
    """collections.defaultdict(dict) of an optimiser's state, read as a plain (empty) dict."""
    return {}


# Globals of a Dassl checkpoint that are read as Inert stand-ins: optimiser/scheduler classes (torch's
# and Dassl's own), the defaultdict of an optimiser state, and numpy scalars (val_result).
INERT_GLOBALS = ("torch.optim.", "dassl.", "collections.defaultdict", "builtins.dict", "numpy.dtype",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def load_safely(path: str, trust: bool = False, inert_objects: bool = False):
    """torch.load with weights_only=True: tensors, dicts, lists, numbers and strings only, so loading
    never runs code hidden in the file. `inert_objects` (Dassl checkpoints) also reads the globals of
    INERT_GLOBALS, as inert stand-ins that are never called. Any other global is refused naming it;
    only `trust` (--trust-checkpoint) unpickles it for real."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)  # runs code: the user said so
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)   # scans, never executes
    except Exception:  # a legacy (pre-1.6) or broken file: weights_only=True alone decides below
        unsafe = []
    refused = [g for g in unsafe if not (inert_objects and g.startswith(INERT_GLOBALS))]
    if refused:
        raise RunError(f"refusing to load {path}: it pickles {refused[0]}, which could run code; {TRUST_HINT}")
    stand_ins = [(_plain_dict if g == "collections.defaultdict" else Inert, g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a global the scan missed (legacy format), or an odd pickle
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise RunError(f"refusing to load {path}: it pickles {found.group(1)}, which could run code; "
                           f"{TRUST_HINT}") from None
        reason = re.search(r"WeightsUnpickler error: \s*(.*?)\s*\n", str(e) + "\n")
        raise RunError(f"cannot read checkpoint {path} ({reason.group(1) if reason else 'UnpicklingError'}): it is "
                       f"corrupted, truncated or not plain data; train that run again (--overwrite)") from None
    except Exception as e:
        raise RunError(f"cannot read checkpoint {path} ({type(e).__name__}): it is corrupted or truncated; "
                       f"train that run again (--overwrite)") from None


# What every checkpoint of ours holds, per kind (train_backbone.checkpoint, train_dpc.checkpoint), with
# the types the stages rely on; RUN_ARGS: the entries of its args that are read back.
RUN_KEYS = {"backbone": ("learner", "clip", "data", "classnames", "state", "epoch", "finished", "args", "optimizer",
                         "gpa_sum", "best"),
            "dpc": ("learner", "clip", "data", "classnames", "backbone", "tuned_prompt", "mixed_prompt", "epoch",
                    "finished", "args", "optimizer")}
RUN_TYPES = {"learner": str, "clip": str, "data": str, "classnames": list, "state": dict, "epoch": int,
             "finished": bool, "args": dict, "optimizer": dict, "backbone": str, "tuned_prompt": dict,
             "mixed_prompt": dict, "gpa_sum": (dict, type(None)), "best": (tuple, list, type(None))}
RUN_ARGS = {"backbone": {"seed": int, "root": str, "shots": int},
            "dpc": {"seed": int, "root": str, "shots": int, "omega_b": (int, float), "omega_n": (int, float),
                    "base_inference": str}}
SCRIPT = {"backbone": "train_backbone.py", "dpc": "train_dpc.py"}


def schema_problem(ckpt: dict, kind: str) -> str | None:
    """What is missing or of the wrong type in a checkpoint of ours, or None."""
    missing = [k for k in RUN_KEYS[kind] if k not in ckpt]
    if missing:
        return f"missing {missing}"
    wrong = [k for k in RUN_KEYS[kind] if not isinstance(ckpt[k], RUN_TYPES[k])
             or (RUN_TYPES[k] is int and isinstance(ckpt[k], bool))]
    if wrong:
        return f"{wrong[0]} is a {type(ckpt[wrong[0]]).__name__}"
    if ckpt["learner"] not in prompts.LEARNERS:
        return f"unknown learner {ckpt['learner']!r}"
    if not all(isinstance(c, str) for c in ckpt["classnames"]):
        return "classnames are not all strings"
    for part in ("state",) if kind == "backbone" else ("tuned_prompt", "mixed_prompt"):
        if not all(isinstance(k, str) for k in ckpt[part]):
            return f"{part} has names that are not strings"
    best = ckpt.get("best")
    if best is not None and not (len(best) == 2 and isinstance(best[0], (int, float)) and isinstance(best[1], dict)):
        return "best is not (accuracy, state)"
    args = ckpt["args"]
    for name, types in RUN_ARGS[kind].items():
        if not isinstance(args.get(name), types) or isinstance(args.get(name), bool):
            return f"args[{name!r}] is {args.get(name)!r}"
    return None


def read_checkpoint(path: str, trust: bool = False) -> dict:
    """A run checkpoint of train_backbone.py / train_dpc.py, read safely and checked once, here: its
    schema (kind, learner, clip, data, state, finished, ...) and finite prompt values."""
    ckpt = load_safely(path, trust)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in RUN_KEYS:
        raise RunError(f"{path} was not written by train_backbone.py or train_dpc.py (no kind 'backbone' or "
                       f"'dpc'): pass a run folder of this project, or a Dassl folder to train_dpc.py --backbone")
    problem = schema_problem(ckpt, kind)
    if problem:
        raise RunError(f"{path} is an incomplete or damaged {kind} checkpoint ({problem}): "
                       f"train that run again with {SCRIPT[kind]} --overwrite")
    parts = {"state": ckpt["state"], "gpa_sum": ckpt["gpa_sum"] or {}, "best": ckpt["best"][1] if ckpt["best"] else {}} \
        if kind == "backbone" else {part: ckpt[part] for part in ("tuned_prompt", "mixed_prompt")}
    tensors = {f"{part} {k}": v for part, values in parts.items() for k, v in values.items()}
    check_finite(tensors, path, f"train that run again with a lower --lr ({SCRIPT[kind]} --overwrite)")
    return ckpt


def load_optimizer_state(optimizer, state: dict, path: str) -> None:
    """Restore an optimiser state dict of a checkpoint (--resume, --continue-from); one error line,
    not a failure at the first step, when it does not fit this run's tensors."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise RunError(f"the optimiser state in {path} does not fit this run ({type(e).__name__}); "
                       f"train that run again with --overwrite") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state[p].get("momentum_buffer")
            if buffer is not None and (not isinstance(buffer, torch.Tensor) or buffer.shape != p.shape):
                raise RunError(f"the optimiser state in {path} does not fit this run (a momentum buffer of "
                               f"another shape); train that run again with --overwrite")


def check_finite(tensors: dict, path: str, fix: str) -> None:
    """A NaN/inf prompt gives chance accuracy or a diverging DPC run: refuse it where it is read."""
    for name, value in tensors.items():
        problem = clip_model.tensor_problem(value)   # a dense CPU tensor inside its storage
        if problem:
            raise RunError(f"{path}: {name} is {problem}: the file is damaged or was not written by a training "
                           f"script; train that run again")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RunError(f"{path}: {name} holds NaN/inf values (the run diverged); {fix}")


# ------------------------------------------------------------------------------------------------
# CLIP, data, schedule, evaluation (shared with train_dpc.py and evaluate.py)
# ------------------------------------------------------------------------------------------------

TOY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_clip.pt")


def clip_path(name: str) -> str:
    """A --clip that names a weights file is recorded as an absolute path, so that the run can be
    evaluated (and DPC trained on it) from another folder; model names are kept as they are."""
    return os.path.abspath(name) if name not in ("tiny", "toy") and os.path.isfile(name) else name


def load_clip(name: str, device):
    """'tiny' is a fixed random CLIP (seed 0) so every stage of a smoke run sees the same weights;
    'toy' is the small CLIP pretrained on the toy world, shipped in assets/ (tools/pretrain_toy_clip.py)."""
    if name == "tiny":
        return clip_model.random_clip("tiny", seed=0).to(device)
    if name == "toy":
        if not os.path.isfile(TOY_CLIP):
            raise clip_model.CLIPLoadError(f"the toy CLIP {TOY_CLIP} is missing: restore it with `git checkout "
                                           f"-- assets/toy_clip.pt` or rebuild it with `python "
                                           f"tools/pretrain_toy_clip.py` (about 10 minutes on 2 CPU cores)")
        return clip_model.load(TOY_CLIP).to(device)
    return clip_model.load(name).to(device)


def check_halves(splits: dict, dataset: str, subsample: str) -> None:
    """Base-to-new needs two classes in each half: one class is always right (100%, and no negatives)."""
    n = {half: len(data.classnames_of(splits[half]["train"])) for half in ("base", "new")}
    if subsample == "base" and min(n.values()) < 2:
        raise RunError(f"{dataset} has {n['base'] + n['new']} classes: base-to-new needs at least 4 (2 base, "
                       f"2 new), since a half of one class is always right; add classes or pass --subsample all")


def load_splits(dataset: str, root: str, shots: int, seed: int) -> dict:
    """Few-shot sets drawn over all classes (Dassl order), then the base/new views (DECISIONS #3).

    Returns {"all", "base", "new", "full"}, each {"train", "val", "test"}; "full" before few-shot sampling."""
    if dataset == "synthetic" and not os.path.isdir(os.path.join(root, "synthetic")):
        data.make_synthetic_imagefolder(root, "synthetic")
    if dataset == "toy" and not os.path.isdir(os.path.join(root, "toy")):
        data.make_toy_dataset(root)   # the toy world's benchmark split (data.py, "Toy world"), ~5 s
    splits = data.read_splits(root, dataset)
    train, val = data.few_shot(splits["train"], splits["val"], shots, seed) if shots > 0 else (splits["train"], splits["val"])
    counts = {}
    for item in splits["train"]:
        counts[item.classname] = counts.get(item.classname, 0) + 1
    short = sorted((n, name) for name, n in counts.items() if n < shots)
    if short:  # Dassl takes all images of such a class, without repeats: so do we, but say so once
        log(f"warning: --shots {shots}, but {len(short)} classes have fewer train images (fewest: {short[0][0]} "
            f"in '{short[0][1]}'); those classes use all their images")
    full = dict(splits, train=train, val=val)
    return {"all": full, "base": data.subsample(full, "base"), "new": data.subsample(full, "new"),
            "full": splits}


def lr_at(epoch: int, base_lr: float, epochs: int) -> float:
    """Dassl's schedule, stepped per epoch (DECISIONS #5; epochs counted from 1):
    1. epoch 1 warms up at a constant 1e-5;
    2. epoch k >= 2 follows a cosine over all E epochs, offset by one: epoch 2 runs at the full lr;
    3. so the last epoch does not reach 0 (e.g. E = 5, lr 0.0035: 1e-5, .0035, .003166, .002291, .001209).
    """
    if epoch == 1:
        return 1e-5
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 2) / epochs))


def autocast(device: str):
    """bf16 autocast on GPU (fp16 where bf16 is missing), plain fp32 on CPU (DECISIONS #1)."""
    if not device.startswith("cuda"):
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def grad_scaler(device: str):
    """Loss scaling for fp16 autocast (GPUs without bf16: V100, T4), where small gradients underflow;
    a no-op for bf16 and fp32. Both stages use it (DECISIONS #1)."""
    return torch.amp.GradScaler(enabled=device.startswith("cuda") and not torch.cuda.is_bf16_supported())


def check_diverged(prompt: dict, epoch: int) -> None:
    """The trained tensors after an epoch: a step can turn them NaN/inf even when every loss before it
    was finite (the last step of a run); such an epoch is never saved, let alone as finished."""
    bad = next((n for n, t in prompt.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise RunError(f"{bad} holds NaN/inf after epoch {epoch} (the run diverged): lower --lr; "
                       + kept_checkpoint(epoch))


def kept_checkpoint(epoch: int) -> str:
    """What a run stopped in `epoch` leaves behind: the checkpoint of epoch - 1, if there is one."""
    if epoch > 1:
        return f"the last good checkpoint (epoch {epoch - 1}) is kept"
    return "no checkpoint was written (it failed in the first epoch)"


def train_set(items, image_size):
    """Training images with train augmentation. Small sets (few-shot) are decoded once, here, and kept
    in memory: decoding never dominates a step, and an unreadable image stops the run before it starts."""
    return data.ImageDataset(items, data.train_transform(image_size), cache=len(items) <= 20000)


def make_loader(dataset, batch_size, shuffle, workers, seed=0, drop_last=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last and len(dataset) >= batch_size, generator=generator,
                                       persistent_workers=False, pin_memory=False)


# ------------------------------------------------------------------------------------------------
# Evaluation: each test image is encoded once per distinct visual encoder (DECISIONS #18)
# ------------------------------------------------------------------------------------------------

# Default folder of the on-disk feature cache (--feature-cache; "off" disables it). Safe to delete.
FEATURE_CACHE = os.environ.get("DPC_FEATURE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpc_features")
_MEMO: dict = {}            # in-process: feature key -> (N, E) features, oldest first
_MEMO_BYTES = 4 << 30       # what the in-process memo may hold before it forgets the oldest entries


def add_feature_cache_flag(p):
    p.add_argument("--feature-cache", default=FEATURE_CACHE,
                   help="folder of cached test-image features of CLIP's plain image encoder (keyed by the CLIP "
                        "weights, transform and image files; safe to delete; env DPC_FEATURE_CACHE), or 'off'")


def tensors_digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    each file's path, size, mtime and inode. Features of CLIP's plain encoder (CoOp, zero-shot CLIP) are
    persistent (reused across runs and seeds); prompted ones live in this process only."""
    image_side = prompts.image_side_tensors(learner)
    precision = "fp32" if not device.startswith("cuda") else \
        f"{torch.cuda.get_device_name()} {'bf16' if torch.cuda.is_bf16_supported() else 'fp16'}"
    h = hashlib.sha256()
    h.update(f"{clip_digest(learner.clip)} {type(learner).__name__ if image_side else 'plain'} "
             f"{tensors_digest(image_side) if image_side else ''} "
             f"{data.test_transform(learner.clip.visual.input_resolution)} torch {torch.__version__} "
             f"torchvision {torchvision.__version__} PIL {PIL.__version__} {device} {precision} {batch_size}".encode())
    for item in items:
        st = os.stat(item.path)
        h.update(f"\n{item.path} {st.st_size} {st.st_mtime_ns} {st.st_ino}".encode())
    return h.hexdigest(), not image_side


def encode_images(learner, items, device, workers, batch_size) -> list:
    """f(V) of every item, batch by batch, in the learner's current state: [(B, E), ...]."""
    test_images = data.ImageDataset(items, data.test_transform(learner.clip.visual.input_resolution))
    return [learner.encode_image(images.to(device)) for images, _, _ in make_loader(test_images, batch_size, False, workers)]


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
    if persistent and os.path.isfile(path):
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
                save_atomic([f.cpu() for f in features], path)
            except OSError as e:   # a read-only cache costs time, never the run
                log(f"warning: cannot write the feature cache {path} ({e.strerror}); pass --feature-cache off")
    _MEMO[key] = [f.cpu() for f in features]
    while sum(f.numel() * f.element_size() for v in _MEMO.values() for f in v) > _MEMO_BYTES and len(_MEMO) > 1:
        _MEMO.pop(next(iter(_MEMO)))
    return features


@torch.no_grad()
def accuracy(learner, items, classnames, device, workers=0, prompt=None, batch_size=100, cache=None) -> float:
    """Top-1 accuracy (%) on `items` among `classnames`; text features are computed once, image
    features come from image_features (`cache`: its folder, or None / "off" to always encode).

    `prompt` (optional) replaces the learner's prompt tensors (DPC's base or new prompt)."""
    prompts.check_classnames(learner, classnames)
    labels = torch.tensor([item.label for item in items])
    correct = 0
    with prompts.substitute(learner, prompt or {}), autocast(device):
        text = learner.encode_text(classnames)                                  # (C, E)
        features = image_features(learner, items, device, workers, batch_size, cache)
        for i, image in enumerate(features):                                    # (B, E) each
            logits = prompts.cosine_logits(image, text, 1.0)                     # (B, C)
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


# ------------------------------------------------------------------------------------------------
# Loading a finished backbone run, ours or the original code's (PromptKD teacher, train_dpc.py, evaluate.py)
# ------------------------------------------------------------------------------------------------

def load_backbone(run_dir: str, device, trust: bool = False):
    """The learner of a finished train_backbone.py run, its checkpoint dict and its CLIP."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"no backbone run in {run_dir} (checkpoint.pt missing): train one with train_backbone.py")
    ckpt = read_checkpoint(path, trust)
    a = ckpt["args"]
    if ckpt["kind"] == "dpc":
        raise RunError(f"{run_dir} holds a DPC run (train_dpc.py), not a stage-1 run: pass its backbone "
                       f"{ckpt['backbone']} instead")
    if not ckpt["finished"]:
        raise RunError(f"{run_dir} holds an unfinished backbone run (epoch {ckpt['epoch']}/{a.get('epochs')}): "
                       f"finish it with `train_backbone.py --learner {ckpt['learner']} --data {ckpt['data']} "
                       f"--output-dir {run_dir} --resume`")
    clip = load_clip(ckpt["clip"], device)
    teacher = None
    if ckpt["learner"] == "promptkd":
        teacher, _ = load_teacher(a["teacher"], a.get("teacher_clip") or "ViT-L/14", device, trust)
    learner = prompts.build_learner(ckpt["learner"], clip, teacher, a.get("n_ctx"), a.get("ctx_init"), a.get("kd_weight"))
    prompts.load_learner_state(learner, ckpt["state"])
    return learner.to(device).eval(), ckpt, clip


def load_teacher(teacher_dir: str, teacher_clip: str, device, trust: bool = False):
    """PromptKD's teacher and its args: a finished promptsrc run of this project (trained as
    PROMPTKD_TEACHER_RECIPE; its args are returned for the recipe check), or a released Dassl teacher
    folder teacher_model/<Dataset>/ (VLPromptLearner/model-best.pth.tar) on `teacher_clip` (args None)."""
    if os.path.isfile(os.path.join(teacher_dir, "checkpoint.pt")):
        teacher, ckpt, _ = load_backbone(teacher_dir, device, trust)
        name, args = ckpt["learner"], ckpt["args"]
    else:
        teacher, name = dassl_learner(teacher_dir, teacher_clip, device, trust=trust)
        args = None
    if name != "promptsrc":
        raise RunError(f"--teacher {teacher_dir} is a {name} run; PromptKD's teacher is a promptsrc run")
    return teacher, args


def teacher_recipe_differences(args: dict) -> dict:
    """{flag: (teacher's value, the original recipe's)} where our teacher run left the recipe."""
    return {k: (args.get(k), v) for k, v in PROMPTKD_TEACHER_RECIPE.items() if k != "learner" and args.get(k) != v}


# Dassl folder name -> our learner (VLPromptLearner holds PromptSRC or, with a projector, PromptKD).
DASSL_FOLDERS = {"prompt_learner": "coop", "MultiModalPromptLearner": "maple", "VLPromptLearner": "promptsrc"}


def dassl_state(name: str, state: dict) -> dict:
    """Rename a Dassl stage-1 state dict to our learner's names (backbones.md §4.2, §5.2, §6.2, §7.3).
    CoOp saves its prompt learner alone (`ctx` + token buffers); MaPLe, PromptSRC and PromptKD save the
    whole model, whose frozen CLIP copies are dropped here, as are the token prefix/suffix buffers.
    PromptKD's projector is 1x1 convolutions there (`VPT_image_trans.conv1.{0,1,3}`), Linear here."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.endswith(".VPT_shallow") and not (len(parts) > 3 and parts[3].isdigit()):
            raise RunError(f"the Dassl {name} checkpoint holds {key!r}, which the original code never writes "
                           f"(expected <encoder>.transformer.resblocks.<i>.VPT_shallow): is it damaged?")
        if name in ("promptsrc", "promptkd"):
            if key == "prompt_learner.ctx" and name == "promptsrc":
                key = "ctx"
            elif key == "image_encoder.VPT":
                key = "visual_prompt"
            elif key.endswith(".VPT_shallow") and parts[0] == "image_encoder":
                key = f"visual_deep.{int(parts[3]) - 1}"
            elif key.endswith(".VPT_shallow") and parts[0] == "text_encoder" and name == "promptsrc":
                key = f"text_deep.{int(parts[3]) - 1}"
            elif key.startswith("VPT_image_trans.conv1.") and name == "promptkd":
                key = f"projector.{parts[2]}.{parts[3]}"
                value = value.flatten(1) if value.dim() == 4 else value   # (out, in, 1, 1) -> (out, in)
            else:
                continue
        elif name == "maple":  # MultiModalPromptLearner/ holds the whole model; ours are its prompt learner's
            if parts[0] != "prompt_learner" or parts[1].startswith("token_"):
                continue
            key = key[len("prompt_learner."):]
        elif key.startswith("token_"):
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def read_dassl_checkpoint(path: str, trust: bool = False) -> dict:
    """The `state_dict` of a Dassl checkpoint ({"state_dict", "epoch", "optimizer", "scheduler",
    "val_result"}), read without running code: the pickled optimiser/scheduler objects become Inert."""
    ckpt = load_safely(path, trust, inert_objects=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise RunError(f"{path} is not a Dassl checkpoint (no 'state_dict'): pass the run folder of the original "
                       f"code that holds <{'|'.join(DASSL_FOLDERS)}>/model.pth.tar-N")
    check_finite({f"state_dict {k}": v for k, v in state.items()}, path, "use another epoch's file of that run")
    return state


def is_promptkd_student(state: dict) -> bool:
    """A Dassl VLPromptLearner state dict of a PromptKD student: it has the projector, a PromptSRC one has not."""
    return any(k.startswith("VPT_image_trans") for k in state)


def dassl_learner(run_dir: str, clip_name: str, device, teacher_dir: str = None, teacher_clip: str = None,
                  trust: bool = False):
    """The learner of a stage-1 folder of the original code: <run>/<name>/model.pth.tar-N (newest N)
    or model-best.pth.tar. A PromptKD student is read from model-best.pth.tar when the folder has one,
    as the released DPC code does (PromptKD saves its best-val student; spec dpc_official_code §1.2),
    and also needs its teacher (load_teacher)."""
    for folder, name in DASSL_FOLDERS.items():
        files = sorted((p for p in glob.glob(os.path.join(run_dir, folder, "model.pth.tar-*"))
                        if p.rsplit("-", 1)[1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[1]))
        files = files or glob.glob(os.path.join(run_dir, folder, "model-best.pth.tar"))
        if files:
            break
    else:
        raise RunError(f"no finished backbone run in {run_dir}: expected checkpoint.pt (train_backbone.py) "
                       f"or a Dassl folder <run>/<{'|'.join(DASSL_FOLDERS)}>/model.pth.tar-N")
    best, state = os.path.join(run_dir, folder, "model-best.pth.tar"), None
    if folder == "VLPromptLearner" and os.path.isfile(best):   # read once: a student is taken from its best file
        state = read_dassl_checkpoint(best, trust)
        if is_promptkd_student(state):
            files = [best]
        elif files[-1] != best:
            state = None
    state = read_dassl_checkpoint(files[-1], trust) if state is None else state
    teacher = None
    if is_promptkd_student(state):
        name = "promptkd"
        if not teacher_dir:
            raise RunError(f"{run_dir} is a Dassl PromptKD run: pass --teacher with its PromptSRC teacher "
                           f"folder (teacher_model/<Dataset>) and --teacher-clip")
        teacher, _ = load_teacher(teacher_dir, teacher_clip, device, trust)
    clip = load_clip(clip_name, device)
    learner = prompts.build_learner(name, clip, teacher, n_ctx=2 if name == "maple" else None)
    prompts.load_learner_state(learner, dassl_state(name, state))
    print(f"loaded Dassl {name} backbone {files[-1]}")
    return learner.to(device).eval(), name


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def main(args):
    check_not_a_source(args.output_dir, continue_from=args.continue_from, teacher=args.teacher)
    previous = check_run_folder(args)
    torch.manual_seed(args.seed)
    clip = load_clip(args.clip, args.device)
    image_size = clip.visual.input_resolution
    splits = load_splits(args.data, args.root, args.shots, args.seed)
    check_halves(splits, args.data, args.subsample)

    # PromptKD distils on unlabeled images of all classes; the others train on the base classes
    # (or on all of them for the cross-dataset protocol).
    train_items = splits["all" if args.learner == "promptkd" else args.subsample]["train"]
    classnames = data.classnames_of(train_items)
    teacher = None
    if args.learner == "promptkd":
        if not args.teacher:
            raise RunError("--learner promptkd needs --teacher RUN_DIR: a promptsrc run of this project (README) or "
                           "a released teacher folder teacher_model/<Dataset> of the original code")
        teacher, teacher_args = load_teacher(args.teacher, args.teacher_clip, args.device, args.trust_checkpoint)
        differ = teacher_recipe_differences(teacher_args) if teacher_args is not None else {}
        if differ:  # the student copies its teacher: another teacher moves every PromptKD number
            log(f"warning: --teacher {args.teacher} was trained with " + ", ".join(
                f"{k} {theirs} (original teacher: {ours})" for k, (theirs, ours) in differ.items()) +
                "; PromptKD's numbers assume the original teacher recipe (README)")
    continued = None
    if args.continue_from:  # Tab. 3 row (1), TS: the stage-1 run tuned for another --epochs
        _, continued, _ = load_backbone(args.continue_from, "cpu", args.trust_checkpoint)
        mine = dict(learner=args.learner, data=args.data, clip=args.clip, subsample=args.subsample)
        theirs = {k: continued["args"].get(k) for k in mine}
        if mine != theirs:
            raise RunError(f"--continue-from {args.continue_from} is a run of {theirs}, this command asks for "
                           f"{mine}: continue it with its own flags")
    train_images = train_set(train_items, image_size)
    torch.manual_seed(args.seed)  # prompt initialisation does not depend on the teacher being loaded
    learner = prompts.build_learner(args.learner, clip, teacher, args.n_ctx, args.ctx_init, args.kd_weight).to(args.device)
    prompts.check_classnames(learner, data.classnames_of(splits["all"]["train"]), training=True)
    params = prompts.trainable_parameters(learner)
    check_disk(args.output_dir, prompts.learner_state(learner).values())
    start_run(args)
    log(f"learner {args.learner}: {sum(p.numel() for p in params.values()):,} trainable values in "
        f"{len(params)} tensors; {len(train_items)} train images, {len(classnames)} classes")
    # Dassl: SGD momentum 0.9, weight decay 5e-4 on every trainable tensor (DECISIONS #5).
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(args.device)
    gpa = prompts.gpa_weights(args.epochs, args.gpa_mean, args.gpa_std) if args.learner == "promptsrc" else None
    gpa_sum, best, start_epoch = None, None, 1   # best: (base test accuracy, learner state)
    if continued is not None and previous is None:  # same prompt and optimiser state; the schedule restarts
        prompts.load_learner_state(learner, continued["state"])
        load_optimizer_state(optimizer, continued["optimizer"], os.path.join(args.continue_from, "checkpoint.pt"))
        log(f"continuing the finished run {args.continue_from} (epoch {continued['epoch']}) for {args.epochs} epochs")
    if previous is not None:
        prompts.load_learner_state(learner, previous["state"])
        load_optimizer_state(optimizer, previous["optimizer"], os.path.join(args.output_dir, "checkpoint.pt"))
        gpa_sum, best, start_epoch = previous["gpa_sum"], previous.get("best"), previous["epoch"] + 1
        log(f"resuming after epoch {previous['epoch']}")

    steps_per_epoch = len(train_items) // args.batch_size if len(train_items) >= args.batch_size else 1
    for epoch in range(start_epoch, args.epochs + 1):
        # Every epoch is seeded by (seed, epoch): a resumed run replays exactly what it would have done.
        torch.manual_seed(args.seed * 1000 + epoch)
        loader = make_loader(train_images, args.batch_size, True, args.workers,
                             seed=args.seed * 1000 + epoch, drop_last=True)
        lr = lr_at(epoch, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        learner.train()
        t_epoch, t_wait, t_last = time.time(), 0.0, time.time()
        for it, (images, labels, _) in enumerate(loader, 1):
            t_wait += time.time() - t_last
            images, labels = images.to(args.device, non_blocking=True), labels.to(args.device)
            with autocast(args.device):
                out = learner.training_loss(images, labels, classnames)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise RunError(f"loss is {loss.item()} at epoch {epoch} iteration {it}: lower --lr; "
                               + kept_checkpoint(epoch))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            t_last = time.time()
            if it % args.print_every == 0 or it == len(loader):
                elapsed = time.time() - t_epoch
                left = (args.epochs - epoch) * steps_per_epoch + len(loader) - it
                log(f"epoch {epoch}/{args.epochs} it {it}/{len(loader)} loss {loss.item():.4f} lr {lr:.2e} "
                    f"{it * args.batch_size / elapsed:.1f} img/s data-wait {100 * t_wait / elapsed:.0f}% "
                    f"eta {left * elapsed / it / 60:.1f} min")
        if gpa is not None:  # PromptSRC §3.3: Gaussian-weighted sum of the end-of-epoch prompts
            snapshot = {n: p.detach().float() * gpa[epoch - 1] for n, p in params.items()}
            gpa_sum = snapshot if gpa_sum is None else {n: gpa_sum[n] + snapshot[n] for n in snapshot}
        if args.select_best_on_base_test:  # PromptKD's original selection: on the base TEST split
            learner.eval()
            acc = accuracy(learner, splits["base"]["test"], data.classnames_of(splits["base"]["test"]),
                           args.device, args.workers, cache=args.feature_cache)
            best = (acc, prompts.learner_state(learner)) if best is None or acc > best[0] else best
            log(f"epoch {epoch}: base test accuracy {acc:.2f} (best {best[0]:.2f})")
        check_diverged(params, epoch)
        save_atomic(checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, finished=False),
                    os.path.join(args.output_dir, "checkpoint.pt"))

    if gpa_sum is not None:  # checkpoints hold the last epoch's prompts, never the aggregate
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(gpa_sum[n])
    if best is not None:
        prompts.load_learner_state(learner, best[1])
    learner.eval()
    results = base_to_new(learner, splits, args.device, args.workers, subsample=args.subsample, cache=args.feature_cache)
    log_results(results, f"{args.learner} backbone")
    save_atomic(checkpoint(args, learner, classnames, args.epochs, optimizer, gpa_sum, best, finished=True),
                os.path.join(args.output_dir, "checkpoint.pt"))
    write_json_atomic(dict(results, kind="backbone", learner=args.learner, data=args.data, seed=args.seed,
                           shots=args.shots, epochs=args.epochs), os.path.join(args.output_dir, "results.json"))
    os.makedirs(os.path.dirname(LAST_BACKBONE), exist_ok=True)
    tmp = f"{LAST_BACKBONE}.{os.getpid()}.tmp"   # runs in parallel (tools/reproduce.py) never mix
    with open(tmp, "w") as f:
        f.write(os.path.abspath(args.output_dir) + "\n")
    os.replace(tmp, LAST_BACKBONE)
    return results


def checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, finished):
    """Small and self-describing: the learner's own tensors, never the frozen CLIP."""
    return dict(kind="backbone", learner=args.learner, clip=args.clip, data=args.data, classnames=classnames,
                state=prompts.learner_state(learner), epoch=epoch, finished=finished, args=vars(args),
                optimizer=optimizer.state_dict(), gpa_sum=gpa_sum, best=best)


ERRORS = (RunError, data.DataError, clip_model.CLIPLoadError, prompts.LearnerError, OSError)


def one_line(e: Exception) -> str:
    """The message of an expected error on one line. An error raised in a DataLoader worker comes
    back wrapped in the worker's traceback: keep its last line, the original message."""
    message = str(e).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(e, OSError) and e.strerror:
        message = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return message.replace("\n", " ")


def run_cli(main_fn, get_args_fn, argv=None, errors=()):
    """Entry point of every script: an expected failure ends in ONE line on stderr and exit code 2;
    Ctrl-C ends in one line and exit code 130, keeping the last finished epoch's checkpoint."""
    try:
        return main_fn(get_args_fn(argv))
    except ERRORS + tuple(errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: a training run keeps its last finished epoch; rerun the same command with --resume",
              file=sys.stderr)
        sys.exit(130)


def run(argv=None):
    return run_cli(main, get_args, argv)


if __name__ == "__main__":
    run()
