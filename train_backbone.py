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
import json
import math
import os
import platform
import shutil
import sys
import time

import torch

import clip_model
import data
import prompts

LAST_BACKBONE = os.path.join("output", "last_backbone.txt")  # where train_dpc.py finds the latest run


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
    p.add_argument("--teacher", default=None, help="PromptKD: run folder of a promptsrc backbone run (ViT-L/14 in the paper)")
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
    args.output_dir = args.output_dir or os.path.join("output", args.data, args.learner, f"seed{args.seed}")
    args.root = os.path.abspath(args.root)  # runs are re-evaluated from other folders
    args.teacher = args.teacher and os.path.abspath(args.teacher)
    check_positive(args, "epochs", "batch_size", "lr")
    check_shots(args.shots)
    return args


def add_run_flags(p):
    """Flags every training script shares: run-folder handling, data loading, device."""
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="start over even if --output-dir holds a run")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0 = in the main process); "
                   "train_dpc.py also renders its negatives on this many threads. On <= 2 cores use 0")
    p.add_argument("--print-every", type=int, default=20, help="iterations between progress lines")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def check_shots(shots: int) -> None:
    if shots < 0:
        raise RunError(f"--shots must be 0 (all images) or positive, got {shots}")


def check_positive(args, *names):
    for name in names:
        if not getattr(args, name) > 0:
            raise RunError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


# ------------------------------------------------------------------------------------------------
# Run folder, logging, checkpoints (shared with train_dpc.py and evaluate.py)
# ------------------------------------------------------------------------------------------------

def check_run_folder(args):
    """Before anything is written: the unfinished checkpoint to resume from, or None.
    A finished run is never touched without --overwrite."""
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if not os.path.exists(path) or args.overwrite:
        return None
    previous = read_checkpoint(path)
    if previous["finished"]:
        raise RunError(f"{args.output_dir} already holds a finished run: re-evaluate it with evaluate.py, "
                       f"or pass --overwrite to train again (or another --output-dir)")
    if not args.resume:
        raise RunError(f"{args.output_dir} holds an unfinished run (epoch {previous['epoch']}/"
                       f"{previous['args']['epochs']}): pass --resume to continue or --overwrite to start over")
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
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"cannot read checkpoint {path} ({type(e).__name__}): it is corrupted or truncated; "
                       f"train that run again (--overwrite)") from None


# ------------------------------------------------------------------------------------------------
# CLIP, data, schedule, evaluation (shared with train_dpc.py and evaluate.py)
# ------------------------------------------------------------------------------------------------

TOY_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_clip.pt")


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


def train_set(items, image_size):
    """Training images with train augmentation. Small sets (few-shot) are decoded once, here, and kept
    in memory: decoding never dominates a step, and an unreadable image stops the run before it starts."""
    return data.ImageDataset(items, data.train_transform(image_size), cache=len(items) <= 20000)


def make_loader(dataset, batch_size, shuffle, workers, seed=0, drop_last=False):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last and len(dataset) >= batch_size, generator=generator,
                                       persistent_workers=False, pin_memory=False)


@torch.no_grad()
def accuracy(learner, items, classnames, device, workers=0, prompt=None, batch_size=100) -> float:
    """Top-1 accuracy (%) on `items` among `classnames`; text features are computed once.

    `prompt` (optional) replaces the learner's prompt tensors (DPC's base or new prompt)."""
    correct = 0
    test_images = data.ImageDataset(items, data.test_transform(learner.clip.visual.input_resolution))
    loader = make_loader(test_images, batch_size, False, workers)
    with prompts.substitute(learner, prompt or {}), autocast(device):
        text = learner.encode_text(classnames)                                  # (C, E)
        for images, labels, _ in loader:
            logits = prompts.cosine_logits(learner.encode_image(images.to(device)), text, 1.0)   # (B, C)
            correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
    return 100.0 * correct / max(len(items), 1)


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def base_to_new(learner, splits, device, workers=0, base_prompt=None, new_prompt=None, subsample="base") -> dict:
    """Base accuracy: base test images among base classes (with base_prompt); new likewise.
    A run trained on all classes (Tab. 2's source) has one accuracy: all test images, all classes."""
    if subsample == "all":
        return dict(all=accuracy(learner, splits["all"]["test"], data.classnames_of(splits["all"]["test"]),
                                 device, workers, base_prompt))
    base = accuracy(learner, splits["base"]["test"], data.classnames_of(splits["base"]["test"]), device, workers, base_prompt)
    new = accuracy(learner, splits["new"]["test"], data.classnames_of(splits["new"]["test"]), device, workers, new_prompt)
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
# Loading a finished backbone run (used for the PromptKD teacher, train_dpc.py and evaluate.py)
# ------------------------------------------------------------------------------------------------

def load_backbone(run_dir: str, device):
    """The learner of a finished train_backbone.py run, its checkpoint dict and its CLIP."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"no backbone run in {run_dir} (checkpoint.pt missing): train one with train_backbone.py")
    ckpt = read_checkpoint(path)
    if ckpt.get("kind") != "backbone" or not ckpt.get("finished"):
        raise RunError(f"{run_dir} does not hold a finished backbone run: finish it with "
                       f"`train_backbone.py --resume --output-dir {run_dir}`")
    clip = load_clip(ckpt["clip"], device)
    teacher = None
    if ckpt["learner"] == "promptkd":
        teacher, _, _ = load_backbone(ckpt["args"]["teacher"], device)
    a = ckpt["args"]
    learner = prompts.build_learner(ckpt["learner"], clip, teacher, a.get("n_ctx"), a.get("ctx_init"), a.get("kd_weight"))
    prompts.load_learner_state(learner, ckpt["state"])
    return learner.to(device).eval(), ckpt, clip


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def main(args):
    previous = check_run_folder(args)
    torch.manual_seed(args.seed)
    clip = load_clip(args.clip, args.device)
    image_size = clip.visual.input_resolution
    splits = load_splits(args.data, args.root, args.shots, args.seed)

    # PromptKD distils on unlabeled images of all classes; the others train on the base classes
    # (or on all of them for the cross-dataset protocol).
    train_items = splits["all" if args.learner == "promptkd" else args.subsample]["train"]
    classnames = data.classnames_of(train_items)
    teacher = None
    if args.learner == "promptkd":
        if not args.teacher:
            raise RunError("--learner promptkd needs --teacher RUN_DIR (a promptsrc run of this project)")
        teacher, teacher_ckpt, _ = load_backbone(args.teacher, args.device)
        if teacher_ckpt["learner"] != "promptsrc":
            raise RunError(f"--teacher {args.teacher} is a {teacher_ckpt['learner']} run; PromptKD needs a promptsrc run")
    train_images = train_set(train_items, image_size)
    torch.manual_seed(args.seed)  # prompt initialisation does not depend on the teacher being loaded
    learner = prompts.build_learner(args.learner, clip, teacher, args.n_ctx, args.ctx_init, args.kd_weight).to(args.device)
    params = prompts.trainable_parameters(learner)
    check_disk(args.output_dir, prompts.learner_state(learner).values())
    start_run(args)
    log(f"learner {args.learner}: {sum(p.numel() for p in params.values()):,} trainable values in "
        f"{len(params)} tensors; {len(train_items)} train images, {len(classnames)} classes")
    # Dassl: SGD momentum 0.9, weight decay 5e-4 on every trainable tensor (DECISIONS #5).
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(enabled=args.device.startswith("cuda") and not torch.cuda.is_bf16_supported())
    gpa = prompts.gpa_weights(args.epochs, args.gpa_mean, args.gpa_std) if args.learner == "promptsrc" else None
    gpa_sum, best, start_epoch = None, None, 1   # best: (base test accuracy, learner state)
    if previous is not None:
        prompts.load_learner_state(learner, previous["state"])
        optimizer.load_state_dict(previous["optimizer"])
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
                raise RunError(f"loss is {loss.item()} at epoch {epoch} iteration {it}: lower --lr; the last "
                               f"good checkpoint (epoch {epoch - 1}) is kept")
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
                           args.device, args.workers)
            best = (acc, prompts.learner_state(learner)) if best is None or acc > best[0] else best
            log(f"epoch {epoch}: base test accuracy {acc:.2f} (best {best[0]:.2f})")
        save_atomic(checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, finished=False),
                    os.path.join(args.output_dir, "checkpoint.pt"))

    if gpa_sum is not None:  # checkpoints hold the last epoch's prompts, never the aggregate
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(gpa_sum[n])
    if best is not None:
        prompts.load_learner_state(learner, best[1])
    learner.eval()
    results = base_to_new(learner, splits, args.device, args.workers, subsample=args.subsample)
    log_results(results, f"{args.learner} backbone")
    save_atomic(checkpoint(args, learner, classnames, args.epochs, optimizer, gpa_sum, best, finished=True),
                os.path.join(args.output_dir, "checkpoint.pt"))
    write_json_atomic(dict(results, kind="backbone", learner=args.learner, data=args.data, seed=args.seed,
                           shots=args.shots, epochs=args.epochs), os.path.join(args.output_dir, "results.json"))
    os.makedirs(os.path.dirname(LAST_BACKBONE), exist_ok=True)
    with open(LAST_BACKBONE, "w") as f:
        f.write(os.path.abspath(args.output_dir) + "\n")
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
