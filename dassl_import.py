"""Stage-1 folders of the original code (Dassl): their checkpoints read and renamed to our learners.

A folder <run>/<prompt_learner|MultiModalPromptLearner|VLPromptLearner|PromptLearner>/model.pth.tar-N of
CoOp, MaPLe, PromptSRC, PromptKD or DePT is read as plain data (checkpoints.load_safely) and its tensors are
renamed to the names of prompts.py (docs/differences.md #11). backbones.dassl_learner builds the learner.
"""

import glob
import os

import checkpoints
from run_folder import RunError


# Dassl folder name -> our learner (VLPromptLearner holds PromptSRC or, with a projector, PromptKD;
# PromptLearner is DePT's CoOp, Koorye/DePT trainers/elp_coop.py, which registers the whole model).
DASSL_FOLDERS = {"prompt_learner": "coop", "MultiModalPromptLearner": "maple", "VLPromptLearner": "promptsrc",
                 "PromptLearner": "coop"}

# DePT's CAT head in the original code -> ours (prompts.DePT): FiLM maps and the linear head.
DEPT_HEAD = {"film_lp_img": "film_image", "film_lp_text": "film_text", "linear_probe_proj": "linear_head"}


def is_dept(state: dict) -> bool:
    """A Dassl state dict of DePT (CoOp or MaPLe + DePT): it holds the CAT head's linear layer."""
    return "linear_probe_proj.weight" in state


def dassl_state(name: str, state: dict) -> dict:
    """Rename a Dassl stage-1 state dict (the original repositories' parameter names) to our learner's
    names (docs/differences.md #11).
    CoOp saves its prompt learner alone (`ctx` + token buffers); MaPLe, PromptSRC and PromptKD save the
    whole model, whose frozen CLIP copies are dropped here, as are the token prefix/suffix buffers.
    PromptKD's projector is 1x1 convolutions there (`VPT_image_trans.conv1.{0,1,3}`), Linear here.
    DePT saves its whole model: the learner's tensors become `learner.*` (CoOp's are under `prompt_learner.`
    there) and its head is renamed by DEPT_HEAD (FiLM fp32, the head fp16 in the original)."""
    if is_dept(state):
        head, rest = {}, {}
        for key, value in state.items():
            module, _, leaf = key.partition(".")
            if module in DEPT_HEAD:
                head[f"{DEPT_HEAD[module]}.{leaf}"] = value.float()
            elif name != "coop":
                rest[key] = value
            elif module == "prompt_learner":   # CoOp's own tensors, as its prompt_learner/ folder holds them
                rest[leaf] = value
        return dict({f"learner.{k}": v for k, v in dassl_state(name, rest).items()}, **head)
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
    ckpt = checkpoints.load_safely(path, trust, inert_objects=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise RunError(f"{path} is not a Dassl checkpoint (no 'state_dict'): pass the run folder of the original "
                       f"code that holds <{'|'.join(DASSL_FOLDERS)}>/model.pth.tar-N")
    checkpoints.check_finite({f"state_dict {k}": v for k, v in state.items()}, path, "use another epoch's file of that run")
    return state


def is_promptkd_student(state: dict) -> bool:
    """A Dassl VLPromptLearner state dict of a PromptKD student: it has the projector, a PromptSRC one has not."""
    return any(k.startswith("VPT_image_trans") for k in state)


def dassl_checkpoint(run_dir: str, trust: bool = False) -> tuple[str, str, dict]:
    """(file, learner name, state_dict) of a stage-1 folder of the original code: <run>/<name>/model.pth.tar-N
    (newest N) or model-best.pth.tar. A PromptKD student is read from model-best.pth.tar when the folder has
    one, as the released DPC code does (PromptKD saves its best-val student)."""
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
    return files[-1], "promptkd" if is_promptkd_student(state) else name, state


class HeadClassesUnknown(RunError):
    """A DePT folder of the original code read without the class names of its head's rows."""


def dassl_options(name: str, state: dict, classnames: list[str] = None, path: str = "") -> dict:
    """build_learner's options for a Dassl state dict. DePT's CoOp has M random context tokens (16 in
    DePT's config; the prompt "X X .. X <class>."), MaPLe 2 tokens of "a photo of a". A DePT head's rows are
    classes that Dassl does not record, so `classnames` must name them, in label order (the base classes)."""
    options = dict(n_ctx=2 if name == "maple" else None, ctx_init=None, dept_classes=None)
    if not is_dept(state):
        return options
    if name == "coop" and "prompt_learner.ctx" in state:
        options.update(n_ctx=len(state["prompt_learner.ctx"]), ctx_init="")
    rows = len(state["linear_probe_proj.weight"])
    if classnames is None:
        raise HeadClassesUnknown(f"{path} is a DePT run of the original code: the {rows} classes of its head must be "
                                 f"given (e.g. --data, the dataset it was trained on), Dassl does not record them")
    if rows != len(classnames):
        raise RunError(f"the DePT head in {path} has {rows} rows, but {len(classnames)} class names were given: "
                       f"pass the dataset (--data, --root) whose base classes it was trained on")
    return dict(options, dept_classes=list(classnames))
