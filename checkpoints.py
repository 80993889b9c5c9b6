"""Checkpoints: what a run saves, and reading any checkpoint without running code from it.

  - load_safely: torch.load(weights_only=True), a Dassl file's optimiser objects read as inert stand-ins,
    any other pickled global refused by name (docs/loading_safely.md);
  - our two kinds (backbone_checkpoint, dpc_checkpoint), their schema and finite values checked where they
    are read (read_checkpoint), optimiser and loss-scaler states restored with one-line errors;
  - the finished runs below a folder and their results.json (find_runs, read_results), for evaluate.py.
"""

import json
import os
import pickle
import re
import sys

import torch

import clip_model
import prompts
import run_folder
from run_folder import RunError


# ------------------------------------------------------------------------------------------------
# Reading checkpoints without running code from them (docs/loading_safely.md)
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
    run_folder.check_regular(path)
    problem = clip_model.zip_problem(path)   # before anything is inflated or allocated
    if problem:
        raise RunError(f"refusing to read {path}: {problem}; it is damaged or was not written by a training script")
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


# What every checkpoint of ours holds, per kind (backbone_checkpoint, dpc_checkpoint below), with
# the types the stages rely on; RUN_ARGS: the entries of its args that are read back.
RUN_KEYS = {"backbone": ("learner", "clip", "data", "classnames", "state", "epoch", "finished", "args", "optimizer",
                         "gpa_sum", "best"),
            "dpc": ("learner", "clip", "data", "classnames", "backbone", "tuned_prompt", "parallel_prompt", "epoch",
                    "finished", "args", "optimizer")}

RUN_TYPES = {"learner": str, "clip": str, "data": str, "classnames": list, "state": dict, "epoch": int,
             "finished": bool, "args": dict, "optimizer": dict, "backbone": str, "tuned_prompt": dict,
             "parallel_prompt": dict, "gpa_sum": (dict, type(None)), "best": (tuple, list, type(None))}

RUN_ARGS = {"backbone": {"seed": int, "root": str, "shots": int},
            "dpc": {"seed": int, "root": str, "shots": int, "omega_b": (int, float), "omega_n": (int, float),
                    "base_inference": str}}

SCRIPT = {"backbone": "train_backbone.py", "dpc": "train_dpc.py"}


def backbone_checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, finished, scaler=None) -> dict:
    """What train_backbone.py saves, small and self-describing: the learner's own tensors, never the frozen
    CLIP. An epoch's checkpoint holds that epoch's prompts and the GPA sum so far (--resume continues from
    them); the finished one holds the reported prompts (GPA aggregate, or the selected epoch): the P of DPC."""
    return dict(kind="backbone", learner=args.learner, clip=args.clip, data=args.data, classnames=classnames,
                state=prompts.learner_state(learner), epoch=epoch, finished=finished, args=vars(args),
                optimizer=optimizer.state_dict(), gpa_sum=gpa_sum, best=best, scaler=scaler_state(scaler))


def dpc_checkpoint(args, backbone, classnames, tuned_prompt, parallel_prompt, epoch, optimizer, finished,
                   scaler=None) -> dict:
    """What train_dpc.py saves: P and the trained P' (the learner's tensors only), never the frozen CLIP."""
    return dict(kind="dpc", learner=args.learner, clip=backbone["clip"], data=args.data, classnames=classnames,
                backbone=os.path.abspath(args.backbone), epoch=epoch, finished=finished, args=vars(args),
                tuned_prompt={n: t.detach().cpu() for n, t in tuned_prompt.items()},
                parallel_prompt={n: t.detach().cpu() for n, t in parallel_prompt.items()},
                optimizer=optimizer.state_dict(), scaler=scaler_state(scaler))


def scaler_state(scaler) -> dict:
    """The GradScaler's state, plain numbers ({} when it is off: bf16 and fp32)."""
    return scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}


def load_scaler_state(scaler, ckpt: dict) -> None:
    """--resume of an fp16 run: the loss scale and growth count it had (older checkpoints have none)."""
    state = ckpt.get("scaler") or {}
    if scaler.is_enabled() and isinstance(state, dict) and isinstance(state.get("scale"), float):
        try:
            scaler.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise RunError("the loss-scaler state of the checkpoint does not fit this run; train that run again "
                           "with --overwrite") from None


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
    for part in ("state",) if kind == "backbone" else ("tuned_prompt", "parallel_prompt"):
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
    if kind == "dpc" and "mixed_prompt" in ckpt and "parallel_prompt" not in ckpt:
        raise RunError(f"{path} was written by an earlier train_dpc.py, which stored the mixed prompt P̃_b and moved P' "
                       f"1/ω_b times farther per step than the released code (docs/differences.md #6): train that run "
                       f"again with train_dpc.py --overwrite")
    problem = schema_problem(ckpt, kind)
    if problem:
        raise RunError(f"{path} is an incomplete or damaged {kind} checkpoint ({problem}): "
                       f"train that run again with {SCRIPT[kind]} --overwrite")
    parts = {"state": ckpt["state"], "gpa_sum": ckpt["gpa_sum"] or {}, "best": ckpt["best"][1] if ckpt["best"] else {}} \
        if kind == "backbone" else {part: ckpt[part] for part in ("tuned_prompt", "parallel_prompt")}
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


def find_runs(paths, trust: bool = False) -> list[tuple[str, dict]]:
    """(run folder, checkpoint) of every finished run. A folder named directly must hold a finished
    run; below a folder named directly, unfinished runs are skipped with a note."""
    found = {}
    for path in paths:
        named = os.path.isfile(os.path.join(path, "checkpoint.pt"))
        if not named and not os.path.isdir(path):
            raise RunError(f"{path} is not a folder: pass run folders (with checkpoint.pt) or folders above them")
        below = [path] if named else sorted(d for d, _, files in os.walk(path) if "checkpoint.pt" in files)
        if not below:
            raise RunError(f"no run in {path}: no checkpoint.pt below it; train one with train_backbone.py")
        for run in below:
            ckpt = read_checkpoint(os.path.join(run, "checkpoint.pt"), trust)   # checked: kind, keys, finite
            if ckpt["finished"]:
                found[os.path.abspath(run)] = ckpt
                continue
            message = (f"{run} is an unfinished run (epoch {ckpt['epoch']}/{ckpt['args'].get('epochs')}): "
                       f"finish it with `{SCRIPT[ckpt['kind']]} --resume --output-dir {run}` and its other flags")
            if named:
                raise RunError(message)
            print(f"skipping: {message}", file=sys.stderr)
    if not found:
        raise RunError(f"no finished run in {', '.join(paths)}")
    return sorted(found.items(), key=lambda r: (r[1]["learner"], r[1]["kind"], r[1]["data"], r[1]["args"]["seed"]))


def read_results(run: str) -> dict | None:
    path = os.path.join(run, "results.json")
    run_folder.check_regular(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        if "all" in results:  # a run trained on all classes (Tab. 2 source)
            return dict(all=float(results["all"]))
        return dict(base=float(results["base"]), new=float(results["new"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}: {e}); pass --recompute") from None
