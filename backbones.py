"""Backbones: CLIP weights and finished stage-1 runs, and what stage 2 inherits from one.

  - load_clip: OpenAI's archives, state dicts, Hugging Face folders and hub ids, 'tiny' (random) and 'toy'
    (assets/toy_clip.pt);
  - load_backbone: a finished train_backbone.py run, rebuilt as its learner (the tuned prompt P);
    dassl_learner: the same for a stage-1 folder of the original code (dassl_import.py);
  - the variants of stage 1 that start from another run: PromptKD's teacher (promptkd_teacher, with the
    recipe the original code trains it with) and Tab. 3's continued run (continued_run);
  - dpc_stage1: what train_dpc.py inherits from its stage-1 run (§3.2): P's learner, its record, and the
    settings DPC continues with (data, root, seed, classes).
"""

import os

import torch

import checkpoints
import clip_model
import dassl_import
import data
import prompts
import run_folder
import scoring
from run_folder import RunError


LAST_BACKBONE = os.path.join("output", "last_backbone.txt")  # where train_dpc.py finds the latest run

# PromptKD's teacher as the original code trains it (PromptSRC config vit_l14_c2_ep20_batch8_4+4ctx,
# 16-shot base classes; docs/differences.md #4): `train_backbone.py --learner promptsrc` with these flags.
PROMPTKD_TEACHER_RECIPE = dict(learner="promptsrc", clip="ViT-L/14", lr=0.005, batch_size=8, epochs=20, shots=16,
                               subsample="base")


# ------------------------------------------------------------------------------------------------
# CLIP and finished stage-1 runs, ours or the original code's (train_dpc.py, evaluate.py)
# ------------------------------------------------------------------------------------------------

TOY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_clip.pt")


def clip_path(name: str) -> str:
    """A --clip that names a weights file or a Hugging Face folder is recorded as an absolute path, so that the
    run can be evaluated (and DPC trained on it) from another folder; model names and hub ids are kept as they are."""
    return os.path.abspath(name) if name not in ("tiny", "toy") and os.path.exists(name) else name


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


def load_backbone(run_dir: str, device, trust: bool = False):
    """The learner of a finished train_backbone.py run, its checkpoint dict and its CLIP."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"no backbone run in {run_dir} (checkpoint.pt missing): train one with train_backbone.py")
    ckpt = checkpoints.read_checkpoint(path, trust)
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
    learner = prompts.build_learner(ckpt["learner"], clip, teacher, a.get("n_ctx"), a.get("ctx_init"), a.get("kd_weight"),
                                    ckpt["classnames"] if a.get("dept") else None, a.get("dept_weight", prompts.DePT.WEIGHT))
    prompts.load_learner_state(learner, ckpt["state"])
    return learner.to(device).eval(), ckpt, clip


def load_stage1(run_dir: str, device, trust: bool = False, clip: str = None, teacher: str = None,
                teacher_clip: str = None):
    """The learner of a finished stage-1 run and its record {learner, clip, data, classnames, args}:
    a train_backbone.py run (checkpoint.pt), or a Dassl folder of the original code, which records no
    dataset, classes or seed (data None) and whose CLIP and PromptKD teacher the flags name (a DePT
    folder, whose head's classes it does not record either, stops with HeadClassesUnknown)."""
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        learner, ckpt, _ = load_backbone(run_dir, device, trust)
        return learner, ckpt
    learner, name = dassl_learner(run_dir, clip, device, teacher, teacher_clip, trust)
    return learner, dict(learner=name, clip=clip, data=None, args={})


def dassl_learner(run_dir: str, clip_name: str, device, teacher_dir: str = None, teacher_clip: str = None,
                  trust: bool = False, classnames: list[str] = None):
    """The learner of a stage-1 folder of the original code (dassl_checkpoint); a PromptKD student also
    needs its teacher (load_teacher), a DePT run the class names of its head (dassl_options)."""
    path, name, state = dassl_import.dassl_checkpoint(run_dir, trust)
    options = dassl_import.dassl_options(name, state, classnames, path)   # before CLIP is loaded: a DePT head needs its classes
    teacher = None
    if name == "promptkd":
        if not teacher_dir:
            raise RunError(f"{run_dir} is a Dassl PromptKD run: pass --teacher with its PromptSRC teacher "
                           f"folder (teacher_model/<Dataset>) and --teacher-clip")
        teacher, _ = load_teacher(teacher_dir, teacher_clip, device, trust)
    learner = prompts.build_learner(name, load_clip(clip_name, device), teacher, **options)
    prompts.load_learner_state(learner, dassl_import.dassl_state(name, state))
    print(f"loaded Dassl {name}{' + DePT' if options['dept_classes'] else ''} backbone {path}")
    return learner.to(device).eval(), name


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
    if isinstance(teacher, prompts.DePT):
        raise RunError(f"--teacher {teacher_dir} is a promptsrc run with DePT's head (--dept); PromptKD's teacher is "
                       f"a plain promptsrc run")
    return teacher, args


def teacher_recipe_differences(args: dict) -> dict:
    """{flag: (teacher's value, the original recipe's)} where our teacher run left the recipe."""
    return {k: (args.get(k), v) for k, v in PROMPTKD_TEACHER_RECIPE.items() if k != "learner" and args.get(k) != v}


def promptkd_teacher(args):
    """train_backbone.py --learner promptkd: its teacher (--teacher), with a warning where our teacher run left
    the original recipe: the student copies its teacher, so another teacher moves every PromptKD number."""
    if not args.teacher:
        raise RunError("--learner promptkd needs --teacher RUN_DIR: a promptsrc run of this project (docs/benchmark.md) or "
                       "a released teacher folder teacher_model/<Dataset> of the original code")
    teacher, teacher_args = load_teacher(args.teacher, args.teacher_clip, args.device, args.trust_checkpoint)
    differ = teacher_recipe_differences(teacher_args) if teacher_args is not None else {}
    if differ:
        run_folder.log(f"warning: --teacher {args.teacher} was trained with " + ", ".join(
            f"{k} {theirs} (original teacher: {ours})" for k, (theirs, ours) in differ.items()) +
            "; PromptKD's numbers assume the original teacher recipe (docs/benchmark.md)")
    return teacher


def continued_run(args) -> dict:
    """train_backbone.py --continue-from (Tab. 3 row 1, TS): the finished stage-1 run it tunes further, which
    must be a run of the same learner, data, CLIP, classes and head as this command asks for."""
    _, continued, _ = load_backbone(args.continue_from, "cpu", args.trust_checkpoint)
    mine = dict(learner=args.learner, data=args.data, clip=args.clip, subsample=args.subsample, dept=args.dept)
    theirs = {k: continued["args"].get(k) for k in mine}
    theirs["dept"] = bool(theirs["dept"])   # runs from before --dept existed
    if mine != theirs:
        raise RunError(f"--continue-from {args.continue_from} is a run of {theirs}, this command asks for "
                       f"{mine}: continue it with its own flags")
    return continued


# ------------------------------------------------------------------------------------------------
# Stage 1 -> stage 2: what train_dpc.py inherits (§3.2)
# ------------------------------------------------------------------------------------------------

def add_backbone_flags(p):
    """train_dpc.py's flags for its stage-1 run: ours record their own; a Dassl folder of the original code
    records none of them."""
    p.add_argument("--data", default=None, help="dataset (default: the backbone's; required for a Dassl folder)")
    p.add_argument("--root", default=None, help="dataset root (default: the backbone's; 'data' for a Dassl folder)")
    p.add_argument("--clip", default="ViT-B/16", help="CLIP of a Dassl backbone (ours record their own): a name, a .pt "
                   "path, a Hugging Face folder or hub id")
    p.add_argument("--teacher", default=None, help="Dassl PromptKD backbone: its Dassl PromptSRC teacher folder")
    p.add_argument("--teacher-clip", default="ViT-L/14", help="CLIP of that Dassl teacher")


def remember_last_backbone(run_dir: str) -> None:
    """Record a finished stage-1 run as the one train_dpc.py continues without --backbone (find_backbone)."""
    os.makedirs(os.path.dirname(LAST_BACKBONE), exist_ok=True)
    tmp = run_folder.temp_name(LAST_BACKBONE)   # runs in parallel (tools/reproduce.py) never mix
    with open(tmp, "w") as f:
        f.write(os.path.abspath(run_dir) + "\n")
    os.replace(tmp, LAST_BACKBONE)


def find_backbone(backbone: str | None) -> str:
    """train_dpc.py --backbone, or the run train_backbone.py wrote last (said aloud, so nobody is surprised)."""
    if backbone:
        return backbone
    if not os.path.isfile(LAST_BACKBONE):
        raise RunError(f"no --backbone given and no {LAST_BACKBONE}: run train_backbone.py first "
                       f"or pass --backbone RUN_DIR")
    with open(LAST_BACKBONE) as f:
        backbone = f.read().strip()
    print(f"using the last backbone run: {backbone}")
    return backbone


def dpc_stage1(args) -> tuple[torch.nn.Module, dict, dict]:
    """What DPC inherits from its stage-1 run (--backbone, or the last one trained): (P's learner, the run's
    record {learner, clip, data, classnames, args}, the settings DPC continues with). The settings are
    {backbone, learner, clip, clip_digest, data, root, seed, subsample, teacher, teacher_clip}: the backbone's own
    unless a flag names them (a Dassl folder records none, so --data must); train_dpc.main records them in args."""
    run_dir = os.path.abspath(find_backbone(args.backbone))      # recorded as is: --resume compares it
    dataset = args.data and data.dataset_name(args.data)          # CoOp's config names too (imagenetv2)
    teacher = args.teacher and os.path.abspath(args.teacher)      # a Dassl run is re-evaluated from other folders
    clip, teacher_clip = clip_path(args.clip), clip_path(args.teacher_clip)
    try:
        learner, record = load_stage1(run_dir, args.device, args.trust_checkpoint, clip, teacher, teacher_clip)
        dept = "train_backbone.py --dept" if isinstance(learner, prompts.DePT) else None   # who made its head
    except dassl_import.HeadClassesUnknown:   # a DePT folder of the original code, refused before its head is built
        dept = "the original code's ExtrasLinearProbe trainer"
    if dept:   # Fig. 5 sets DPC beside DePT, each on the plain backbone
        raise RunError(f"{run_dir} is a DePT run ({dept}): DPC is plugged into the plain backbone, beside "
                       f"DePT, not on top of it; pass the run trained without DePT")
    if record["data"] is None and not dataset:
        raise RunError(f"{run_dir} is a Dassl run: pass --data (and --root, --clip) for it")
    if dataset and record["data"] not in (None, dataset):
        raise RunError(f"--data {dataset}, but the backbone {run_dir} was trained on {record['data']}: "
                       f"DPC continues on the backbone's own classes; drop --data or pick the matching backbone")
    trained = record["args"]                                      # {} for a Dassl folder: seed 1, root data
    return learner, record, dict(
        backbone=run_dir, learner=record["learner"], clip=record["clip"],
        clip_digest=scoring.clip_digest(learner.clip),             # the weights by content (command_line.same_clip)
        data=record["data"] or dataset,
        root=os.path.abspath(args.root or trained.get("root", "data")),
        seed=trained.get("seed", 1) if args.seed is None else args.seed,
        subsample=trained.get("subsample", "base"), teacher=teacher, teacher_clip=teacher_clip)


def check_backbone_classes(backbone: dict, classnames: list[str], args) -> None:
    """A backbone of ours trained on the classes DPC trains on (PromptKD: on all classes, unlabeled)."""
    trained_on = backbone.get("classnames")                          # None for a Dassl folder
    if trained_on and args.learner != "promptkd" and trained_on != classnames:
        raise RunError(f"the backbone was trained on other classes ({trained_on[:3]}...) than the base classes "
                       f"of {args.data} under {args.root} ({classnames[:3]}...): wrong --root?")
