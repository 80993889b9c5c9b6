"""Stage 1 of DPC: tune a prompt learner (CoOp, MaPLe, PromptSRC, PromptKD) on the base classes.

DPC paper §3.2: "we first execute moderate fine-tuning on the original prompt vector in prompt
tuning backbone model, entirely adhering to the baseline settings to obtain the tuned prompt P".
This script is that baseline: the learner's own loss and schedule, then base-to-new evaluation
(base accuracy among base classes, new accuracy among new classes, HM) — the "backbone" row
that "+ DPC" is compared with in Tab. 1.

    python train_backbone.py --learner coop --data eurosat --root /data --seed 1
    python train_backbone.py --learner coop --data synthetic --clip tiny --epochs 2   # offline smoke run
    python train_backbone.py --learner coop --dept --data eurosat --root /data   # + DePT's head (Fig. 5, docs/dept.md)

The run folder (default output/<data>/<learner>/seed<seed>) holds args.json, log.txt,
checkpoint.pt (trainable tensors + optimiser + class names + CLIP name, written atomically every
epoch) and results.json. `--resume` continues an interrupted run from its last finished epoch, with the
flags it was started with; one process writes a run folder at a time (docs/clusters.md).
"""
import argparse
import math
import os

import torch

import backbones
import checkpoints
import command_line
import data
import precision
import prompts
import run_folder
import scoring
from run_folder import RunError, log


# ------------------------------------------------------------------------------------------------
# Flags: defaults are each learner's paper setting (prompts.py, DEFAULTS)
# ------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = command_line.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--learner", required=True, choices=list(prompts.LEARNERS), help="prompt learner (paper §4.1)")
    p.add_argument("--data", required=True,
                   help=f"dataset: one of {', '.join(data.DATASETS)}, a folder name under --root in the "
                        f"ImageFolder layout, 'toy' (the toy world, docs/toy_world.md) or 'synthetic' (random smoke data); the last two "
                        f"are generated under --root if missing")
    p.add_argument("--root", default="data", help="folder holding the datasets")
    p.add_argument("--shots", type=int, default=None,
                   help="images per class (16: base-to-new protocol; PromptKD: 0 = the full train split, all classes)")
    p.add_argument("--seed", type=int, default=1, help="run seed (the protocol averages seeds 1, 2, 3)")
    p.add_argument("--subsample", default="base", choices=("base", "all"),
                   help="train on the base classes (base-to-new, Tab. 1) or all classes (cross-dataset source, Tab. 2)")
    p.add_argument("--clip", default="ViT-B/16", help="CLIP weights: ViT-B/16 (~/.cache/clip), a .pt path, a Hugging Face folder "
                   "or hub id (openai/clip-vit-base-patch16, read offline from the hub cache), 'toy' (assets/toy_clip.pt, "
                   "pretrained on the toy world) or 'tiny' (random, for smoke runs)")
    p.add_argument("--epochs", type=int, default=None, help="default per learner: " + "; ".join(
        f"{k} {v.DEFAULTS['epochs']}" for k, v in prompts.LEARNERS.items()))
    p.add_argument("--batch-size", type=int, default=None, help="default 32 for every learner (DPC paper §4.1)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate; default per learner: " + "; ".join(
        f"{k} {v.DEFAULTS['lr']} ({v.DEFAULTS['source']})" for k, v in prompts.LEARNERS.items()))
    p.add_argument("--n-ctx", type=int, default=None, help="text context tokens (default: CoOp 4, MaPLe 2, PromptSRC 4)")
    p.add_argument("--ctx-init", default=None, help="init phrase (default 'a photo of a'; '' = random init)")
    p.add_argument("--teacher", default=None, help="PromptKD: a promptsrc run trained as the original teacher (docs/benchmark.md: "
                   "ViT-L/14, lr 0.005, batch 8, 20 epochs) or a released Dassl folder teacher_model/<Dataset>")
    p.add_argument("--teacher-clip", default="ViT-L/14", help="CLIP of a Dassl --teacher folder (our runs record their own)")
    p.add_argument("--continue-from", default=None,
                   help="Tab. 3 row (1), TS: start from this finished run's prompt and optimiser state and tune it for "
                        "another --epochs with the same loss and a restarted schedule")
    p.add_argument("--kd-weight", type=float, default=None, help="PromptKD: 1000, or 200 for fgvc_aircraft, oxford_flowers, dtd")
    p.add_argument("--select-best-on-base-test", action="store_true",
                   help="keep the epoch with the best base TEST accuracy (PromptKD's original selection; "
                        "test-set selection, so off by default: the last epoch is reported, docs/differences.md #4)")
    p.add_argument("--dept", action="store_true",
                   help="DePT (Fig. 5): train DePT's CAT head beside the prompt and fuse it on base classes; defaults "
                        "follow DePT's recipe (CoOp: 16 random context tokens, lr 0.0035, 10 epochs, batch 4; MaPLe: "
                        "10 epochs, batch 4; PromptSRC + DePT: our extension, PromptSRC's defaults; docs/dept.md)")
    p.add_argument("--dept-weight", type=float, default=prompts.DePT.WEIGHT,
                   help="DePT's λ in [0, 1]: weight of the head's loss in training and of its logits on base classes")
    p.add_argument("--gpa-mean", type=float, default=15.0, help="PromptSRC Gaussian prompt aggregation mean (epochs)")
    p.add_argument("--gpa-std", type=float, default=1.0, help="PromptSRC Gaussian prompt aggregation std (epochs)")
    p.add_argument("--output-dir", default=None, help="run folder (default output/<data>/<learner>/seed<seed>)")
    command_line.add_run_flags(p)
    args = p.parse_args(argv)
    args.data = data.dataset_name(args.data)   # CoOp's config names too (imagenetv2): runs record ours
    defaults = prompts.LEARNERS[args.learner].DEFAULTS
    if args.dept:   # DePT's own recipe for its learner, then any flag given
        if args.learner == "promptkd":
            raise RunError("--dept with --learner promptkd: PromptKD distils on unlabeled images of all classes and "
                           "DePT's head needs labelled base classes; use coop, maple or promptsrc")
        if not 0 <= args.dept_weight <= 1:
            raise RunError(f"--dept-weight must be in [0, 1] (DePT's λ, 0.7), got {args.dept_weight}")
        defaults = dict(defaults, **prompts.DePT.RECIPE[args.learner])
        args.n_ctx = defaults.get("n_ctx") if args.n_ctx is None else args.n_ctx
        args.ctx_init = defaults.get("ctx_init") if args.ctx_init is None else args.ctx_init
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    args.lr = defaults["lr"] if args.lr is None else args.lr
    if args.shots is None:
        args.shots = 0 if args.learner == "promptkd" else 16
    if args.kd_weight is None and args.learner == "promptkd":
        args.kd_weight = 200.0 if args.data in prompts.KD_WEIGHT_200 else 1000.0
    args.output_dir = args.output_dir or os.path.join(
        "output", args.data, args.learner + "_dept" * args.dept + "_ts" * bool(args.continue_from), f"seed{args.seed}")
    args.root = os.path.abspath(args.root)  # runs are re-evaluated from other folders
    args.teacher = args.teacher and os.path.abspath(args.teacher)
    args.clip, args.teacher_clip = backbones.clip_path(args.clip), backbones.clip_path(args.teacher_clip)
    args.continue_from = args.continue_from and os.path.abspath(args.continue_from)
    command_line.check_positive(args, "epochs", "batch_size", "lr")
    command_line.check_shots(args.shots)
    command_line.check_run_flags(args)
    if args.n_ctx is not None and args.n_ctx < 1:
        raise RunError(f"--n-ctx must be at least 1, got {args.n_ctx}")
    if args.learner == "promptsrc":
        command_line.check_positive(args, "gpa_std")
        if not math.isfinite(args.gpa_mean):
            raise RunError(f"--gpa-mean must be finite, got {args.gpa_mean}")
    if args.learner == "promptkd":
        command_line.check_positive(args, "kd_weight")
        if args.batch_size < 2:
            raise RunError(f"--batch-size {args.batch_size}: PromptKD's projector has BatchNorm, which needs at "
                           f"least 2 images a batch")
    return args


# ------------------------------------------------------------------------------------------------
# The schedule every stage uses
# ------------------------------------------------------------------------------------------------

def lr_at(epoch: int, base_lr: float, epochs: int) -> float:
    """Dassl's schedule, stepped per epoch (docs/differences.md #2; epochs counted from 1):
    1. epoch 1 warms up at a constant 1e-5;
    2. epoch k >= 2 follows a cosine over all E epochs, offset by one: epoch 2 runs at the full lr;
    3. so the last epoch does not reach 0 (e.g. E = 5, lr 0.0035: 1e-5, .0035, .003166, .002291, .001209).
    """
    if epoch == 1:
        return 1e-5
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 2) / epochs))


def sgd(params: dict, lr: float) -> tuple[torch.optim.SGD, list[float]]:
    """Dassl's optimiser: SGD, momentum 0.9, weight decay 5e-4 on every trainable tensor (docs/differences.md #2),
    and the base lr of each of its groups, which lr_at schedules. DePT's staged lr: its head (FiLM maps, linear
    head) in a second group at 6.5x the prompt's lr; every other learner has one group."""
    head = [n for n in params if n.startswith(prompts.DePT.HEAD)]
    groups = [[p for n, p in params.items() if n not in head], [params[n] for n in head]]
    base_lrs = [lr, lr * prompts.DePT.HEAD_LR_MULT]
    return torch.optim.SGD([dict(params=g) for g in groups if g], lr=lr, momentum=0.9, weight_decay=5e-4), base_lrs


# ------------------------------------------------------------------------------------------------
# Stage 1: data -> learner -> SGD loop -> GPA -> base-to-new evaluation -> checkpoint
# ------------------------------------------------------------------------------------------------

def main(args):
    command_line.check_not_a_source(args.output_dir, continue_from=args.continue_from, teacher=args.teacher)
    previous = command_line.check_run_folder(args)
    torch.manual_seed(args.seed)
    clip = backbones.load_clip(args.clip, args.device)
    args.clip_digest = scoring.clip_digest(clip)   # the weights by content: command_line.same_clip compares it
    image_size = clip.visual.input_resolution
    splits = data.load_splits(args.data, args.root, args.shots, args.seed)
    data.check_halves(splits, args.data, args.subsample)

    # PromptKD distils on unlabeled images of all classes; the others train on the base classes
    # (or on all of them for the cross-dataset protocol).
    train_items = splits["all" if args.learner == "promptkd" else args.subsample]["train"]
    classnames = data.classnames_of(train_items)
    teacher = backbones.promptkd_teacher(args) if args.learner == "promptkd" else None
    continued = backbones.continued_run(args) if args.continue_from else None   # Tab. 3 row (1), TS
    train_images = data.train_set(train_items, image_size)
    torch.manual_seed(args.seed)  # prompt initialisation does not depend on the teacher being loaded
    learner = prompts.build_learner(args.learner, clip, teacher, args.n_ctx, args.ctx_init, args.kd_weight,
                                    classnames if args.dept else None, args.dept_weight).to(args.device)
    prompts.check_classnames(learner, data.classnames_of(splits["all"]["train"]), training=True)
    params = prompts.trainable_parameters(learner)
    run_folder.check_disk(args.output_dir, prompts.learner_state(learner).values())
    run_folder.start_run(args)
    log(f"learner {args.learner}: {sum(p.numel() for p in params.values()):,} trainable values in "
        f"{len(params)} tensors; {len(train_items)} train images, {len(classnames)} classes")
    optimizer, base_lrs = sgd(params, args.lr)   # Dassl's SGD; DePT's head in a second group at 6.5x the lr
    scaler = precision.grad_scaler(args.device)
    gpa = prompts.gpa_weights(args.epochs, args.gpa_mean, args.gpa_std) if args.learner == "promptsrc" else None
    gpa_sum, best, start_epoch = None, None, 1   # best: (base test accuracy, learner state)
    if continued is not None and previous is None:  # same prompt and optimiser state; the schedule restarts
        prompts.load_learner_state(learner, continued["state"])
        checkpoints.load_optimizer_state(optimizer, continued["optimizer"], os.path.join(args.continue_from, "checkpoint.pt"))
        log(f"continuing the finished run {args.continue_from} (epoch {continued['epoch']}) for {args.epochs} epochs")
    if previous is not None:
        prompts.load_learner_state(learner, previous["state"])
        checkpoints.load_optimizer_state(optimizer, previous["optimizer"], os.path.join(args.output_dir, "checkpoint.pt"))
        gpa_sum, best, start_epoch = precision.to_device(previous["gpa_sum"], args.device), previous.get("best"), \
            previous["epoch"] + 1
        checkpoints.load_scaler_state(scaler, previous)   # fp16: the loss scale it had, not 2^16 again
        log(f"resuming after epoch {previous['epoch']}")

    steps_per_epoch = len(train_items) // args.batch_size if len(train_items) >= args.batch_size else 1
    for epoch in range(start_epoch, args.epochs + 1):
        # Every epoch is seeded by (seed, epoch): a resumed run replays exactly what it would have done.
        torch.manual_seed(args.seed * 1000 + epoch)
        loader = data.make_loader(train_images, args.batch_size, True, args.workers,
                                  seed=args.seed * 1000 + epoch, drop_last=True, pin=args.device.startswith("cuda"))
        for group, base_lr in zip(optimizer.param_groups, base_lrs):   # DePT: 1e-5 for both in the warm-up epoch
            group["lr"] = lr_at(epoch, base_lr, args.epochs)
        lr = optimizer.param_groups[0]["lr"]   # the prompt's, for the progress lines
        learner.train()
        progress = run_folder.Progress(epoch, args.epochs, len(loader), args.print_every, steps_per_epoch)
        for it, (images, labels, _) in enumerate(loader, 1):
            progress.waited()
            images, labels = images.to(args.device, non_blocking=True), labels.to(args.device)
            with precision.autocast(args.device):
                out = learner.training_loss(images, labels, classnames)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            progress.done(it, lambda s: f"loss {loss.item():.4f} lr {lr:.2e} {it * args.batch_size / s:.1f} img/s",
                          loss)   # a NaN/inf loss stops the run here, naming its iteration
        if gpa is not None:  # PromptSRC §3.3: Gaussian-weighted sum of the end-of-epoch prompts
            snapshot = {n: p.detach().float() * gpa[epoch - 1] for n, p in params.items()}
            gpa_sum = snapshot if gpa_sum is None else {n: gpa_sum[n] + snapshot[n] for n in snapshot}
        if args.select_best_on_base_test:  # PromptKD's original selection: on the base TEST split
            learner.eval()
            acc = scoring.accuracy(learner, splits["base"]["test"], data.classnames_of(splits["base"]["test"]),
                                   args.device, args.workers, cache=args.feature_cache)
            best = (acc, prompts.learner_state(learner)) if best is None or acc > best[0] else best
            log(f"epoch {epoch}: base test accuracy {acc:.2f} (best {best[0]:.2f})")
        run_folder.check_diverged(params, epoch)
        run_folder.save_atomic(checkpoints.backbone_checkpoint(args, learner, classnames, epoch, optimizer, gpa_sum, best, False,
                                                      scaler), os.path.join(args.output_dir, "checkpoint.pt"))

    if gpa_sum is not None:  # the epochs' checkpoints hold their own prompts; the finished one, this aggregate
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(gpa_sum[n])
    if best is not None:
        prompts.load_learner_state(learner, best[1])
    learner.eval()
    results = scoring.base_to_new(learner, splits, args.device, args.workers, subsample=args.subsample, cache=args.feature_cache)
    scoring.log_results(results, f"{args.learner} {'+ DePT' if args.dept else 'backbone'}")
    run_folder.save_atomic(checkpoints.backbone_checkpoint(args, learner, classnames, args.epochs, optimizer, gpa_sum, best, True,
                                                  scaler), os.path.join(args.output_dir, "checkpoint.pt"))
    run_folder.write_json_atomic(dict(results, kind="dept" if args.dept else "backbone", learner=args.learner, data=args.data, seed=args.seed,
                                  shots=args.shots, epochs=args.epochs), os.path.join(args.output_dir, "results.json"))
    backbones.remember_last_backbone(args.output_dir)   # train_dpc.py without --backbone continues this run
    return results


def run(argv=None):
    return command_line.run_cli(main, get_args, argv)


if __name__ == "__main__":
    run()
