"""DPC stage 2: tune a parallel prompt P' next to a frozen tuned prompt P on the base classes.

DPC = Dual-Prompt Collaboration for tuning CLIP (Li et al., CVPR 2025), §3.2-3.4 and Fig. 3. Stage 1
(train_backbone.py) gives the tuned prompt P; this stage freezes P, trains P' with the Dynamic Hard Negative
Optimizer (§3.3: negative sampler, feature filtering, symmetric InfoNCE) and combines the two prompts with
the Weighting-Decoupling module (§3.4) for base and new inference.

Glossary (paper symbol -> name in this file)
  P       tuned_prompt      frozen named tensors of the stage-1 learner (docs/differences.md #5)
  P'      parallel_prompt   the trainable tensors (Eq. 5: P' := P at start), what the hard-negative loss optimises;
                            each step moves it as the released code does (docs/differences.md #6)
  P̃_b     weighting(...)    ω_b P' + (1-ω_b) P, Eq. (12): base classes with --base-inference mixed
  P̃_n     new_class_prompt  ω_n P' + (1-ω_n) P, Eq. (13): new classes
  ω_b/ω_n omega_b/omega_n   --omega-b / --omega-n
  K       topk              top-K classes the frozen backbone (with P) ranks first; K-1 are negatives
  Q       selection_matrix  one-hot L×n matrix picking the mini-batch's text rows (Eq. 8)
  s = 1/τ logit_scale       CLIP's exp(logit_scale) = 100

Shapes: B batch (the paper's b), n base classes, L pairs of the hard-negative mini-batch, E width.
Usage:
  python train_dpc.py --topk 8                       # after train_backbone.py: picks up its last run
  python train_dpc.py --backbone output/eurosat/coop/seed1 --omega-b 0.2 --omega-n 1e-6
  python train_dpc.py --backbone /old/dassl/run --data eurosat --root /data   # a Dassl stage-1 folder
Run folder (default output/<data>/<learner>_dpc/seed<seed>): args.json, log.txt, checkpoint.pt, results.json.
"""

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import backbones
import checkpoints
import command_line
import data
import precision
import prompts
import run_folder
import scoring
from command_line import DPCError, check_omegas, check_topk   # the flags of this stage, checked in one line each
from run_folder import log
from train_backbone import lr_at   # DPC follows the backbone's schedule (Dassl's, docs/differences.md #2)


# ---------------------------------------------------------------------------------------------
# Weighting-Decoupling module (§3.4, Fig. 4)
# Every prompt is a dict {name: tensor} over the same names as the stage-1 learner's trainable
# tensors (docs/differences.md #5), so one function covers text context, deep prompts, projectors, ...

def _check_same_tensors(a: dict, b: dict, what: str) -> None:
    """Mixing only makes sense tensor by tensor; a name or shape mismatch means a wrong checkpoint."""
    if a.keys() != b.keys():
        missing, extra = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
        raise DPCError(f"{what} and tuned_prompt hold different tensors (missing {missing}, extra {extra})")
    for name, x in a.items():
        if x.shape != b[name].shape:
            raise DPCError(f"{what}[{name!r}] has shape {tuple(x.shape)} but tuned_prompt has {tuple(b[name].shape)}")
        if not (x.is_floating_point() and b[name].is_floating_point()):
            raise DPCError(f"{what}[{name!r}] is not a floating-point tensor; only float tensors can be mixed")


def weighting(parallel_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor], omega_b: float) -> dict:
    """F: the dual prompts combined into the mixed prompt P̃_b (--base-inference mixed). torch.lerp is exact where
    the algebra is: P' at ω_b = 1, and P when P' = P (an untrained run); ω_b P + (1-ω_b) P is not P for most ω_b."""
    _check_same_tensors(parallel_prompt, tuned_prompt, "parallel_prompt")
    # Eq. (12): P̃_b = F(P') = ω_b P' + (1 - ω_b) P
    return {k: torch.lerp(tuned_prompt[k], parallel_prompt[k], omega_b) for k in tuned_prompt}


def new_class_prompt(parallel_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor], omega_n: float) -> dict:
    """P̃_n for new classes: mostly P, which holds the backbone's generalisation. F⁻¹(P̃_b) is the trained P'
    itself (docs/differences.md #6). torch.lerp gives P bitwise at ω_n = 0 (new accuracy equals the backbone's, as
    in the paper's tables) and when P' = P (an untrained run), and P' bitwise at ω_n = 1 (Tab. 3 row 2)."""
    _check_same_tensors(parallel_prompt, tuned_prompt, "parallel_prompt")
    # Eq. (13): P̃_n = ω_n F⁻¹(P̃_b) + (1 - ω_n) P, with F⁻¹(P̃_b) = P'
    return {k: torch.lerp(tuned_prompt[k], parallel_prompt[k], omega_n) for k in tuned_prompt}


def initial_parallel_prompt(tuned_prompt: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """P' at step 0: an exact copy of P, so an untrained DPC model is the backbone bitwise at any ω_b, ω_n."""
    # Eq. (5): P' := P, P frozen
    return {n: nn.Parameter(t.detach().clone()) for n, t in tuned_prompt.items()}


def released_step_tensors(learner_name: str, names) -> list[str]:
    """The tensors of P' the released forward decouples, (P̃_b - (1-ω_b) P)/ω_b (docs/differences.md #6): CoOp's
    `ctx` (sple_coop.py); PromptKD's teacher text context only (sple_promptkd.py; its other prompts step at lr);
    MaPLe and PromptSRC have no released DPC trainer: CoOp's rule, every tensor."""
    if learner_name == "promptkd":
        return [n for n in names if n == "teacher.ctx"]
    return list(names)


def scale_released_gradients(parallel_prompt: dict[str, nn.Parameter], names: list[str], omega_b: float) -> None:
    """The released step on P' (docs/differences.md #6). The release's P shares its parameter's storage, so its
    forward (P̃_b - (1-ω_b) P)/ω_b is the parameter's own value, P', whose gradient is (1/ω_b)·∂L/∂P'. SGD then moves
    P' <- P' - lr·(∂L/∂P'/ω_b + wd·P'), with momentum: this function does the 1/ω_b, SGD the rest."""
    for name in names:
        grad = parallel_prompt[name].grad
        if grad is not None:   # a tensor the loss does not reach (PromptKD's teacher.ctx under --loss learner)
            grad.mul_(1 / omega_b)


BASE_INFERENCE_CHOICES = ("parallel", "mixed")


def base_class_prompt(parallel_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor],
                      omega_b: float, base_inference: str) -> dict:
    """The prompt for base-class inference (docs/differences.md #6): "parallel" (default), P', what the released
    code evaluates and what produced the paper's numbers; "mixed", P̃_b = ω_b P' + (1-ω_b) P, Eq. (12) literally."""
    if base_inference == "parallel":
        _check_same_tensors(parallel_prompt, tuned_prompt, "parallel_prompt")
        return dict(parallel_prompt)
    if base_inference == "mixed":
        return weighting(parallel_prompt, tuned_prompt, omega_b)
    raise DPCError(f"--base-inference must be one of {list(BASE_INFERENCE_CHOICES)}; got {base_inference!r}")


# ---------------------------------------------------------------------------------------------
# Feature filtering and hard-negative loss (§3.3)

def selection_matrix(labels: Tensor, n: int) -> Tensor:
    """Q: row j is the one-hot e_{i_j} of the j-th pair's class. The paper writes Q as columns
    (e_{i_1}, ..., e_{i_L}); we store it as the L×n matrix that Eq. (7) multiplies."""
    assert labels.dim() == 1 and (labels.numel() == 0 or 0 <= int(labels.min()) <= int(labels.max()) < n)
    # Eq. (8): Q = (e_{i_1}, ..., e_{i_L}) ∈ {0,1}^{L×n}
    return F.one_hot(labels.long(), n).float()  # (L, n)


def filter_features(text_features: Tensor, labels: Tensor) -> Tensor:
    """Text features of the L pairs, taken from the features of ALL n base classes under P' (§3.3). fp32 with
    autocast off: a bf16 matmul would round the selected rows. Q is built from labels on the CPU, then moved, so the
    GPU is never waited for."""
    n = text_features.shape[0]
    with torch.autocast(device_type=text_features.device.type, enabled=False):
        text_features = text_features.float()  # (n, E)
        # Eq. (6): ĝ(C) = g(C) / ||g(C)||_2 ∈ R^{n×E}
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)  # (n, E)
        q = selection_matrix(labels.cpu(), n).to(text_features.device)  # (L, n)
        # Eq. (7): g(C') = Q · ĝ(C)
        return q @ text_features  # (L, n) @ (n, E) -> (L, E)


def hard_negative_loss(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """Symmetric image-text InfoNCE over the L×L matrix of the hard-negative mini-batch; pair j is
    (image j, text j), every other row/column is a hard negative. ½ [CE(logits) + CE(logitsᵀ)] is half
    of Eq. (9) as printed, the released code's scale, so its lr carries over; Eq. (10) is read as the
    usual softmax over the L texts (Eq. 11: images), as the release does (docs/differences.md #8).
    text_features are unit rows (filter_features). fp32, autocast off: at s = 100 a bf16 cosine is off by ~0.4 logits."""
    assert image_features.shape == text_features.shape and image_features.dim() == 2
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image_features = image_features.float()  # (L, E)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        # Eq. (10)-(11): p = softmax(s · cos) over texts (rows) and over images (columns), s = 1/τ
        logits = logit_scale * image_features @ text_features.float().t()  # (L, E) @ (E, L) -> (L, L)
        target = torch.arange(logits.shape[0], device=logits.device)  # (L,)
        # Eq. (9): L_CL, times ½ (see docstring)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# ---------------------------------------------------------------------------------------------
# Negative sampler (§3.3, docs/differences.md #7)

class HardNegativeBatch(NamedTuple):
    """What the sampler picked (the caller loads the images). Pair j has class pair_labels[j] and image: batch
    image positives[j] for j < len(positives), else pool image negative_images[j - len(positives)]."""
    positives: list[int]        # indices into the batch of the kept positive images
    pair_labels: list[int]      # (L,) positives' classes first, then each positive's negatives in turn
    negative_images: list[int]  # (L - len(positives),) indices into the pool, one per negative class


class NegativeSampler:
    """Builds the hard-negative mini-batch from labels and indices only (no images, no model): deterministic
    given its seed and inputs (main() reseeds it every epoch). pool_labels[j]: the base class of pool image j
    (the few-shot or the full base train split; never val/test or a new class: scores cover base classes).
    min_negatives: the top-up (docs/differences.md #7)."""

    def __init__(self, pool_labels: list[int], n_base: int, topk: int, seed: int, min_negatives: int = 2):
        if not 2 <= topk <= n_base:
            raise DPCError(f"topk {topk} must be in [2, {n_base}]; pass it through check_topk first")
        if min_negatives < 0:
            raise DPCError(f"--min-negatives must be 0 or more; got {min_negatives}")
        bad = sorted({int(y) for y in pool_labels if not 0 <= int(y) < n_base})
        if bad:
            raise DPCError(f"negative pool has labels {bad[:5]} outside the {n_base} base classes")
        self.n_base, self.topk, self.min_negatives = n_base, topk, min_negatives
        self.images_of_class = [[] for _ in range(n_base)]  # class -> pool indices, in pool order
        for j, y in enumerate(pool_labels):
            self.images_of_class[int(y)].append(j)
        self.rng = random.Random(seed)  # own stream: independent of torch/global seeding and of workers

    def sample(self, scores: Tensor, labels: Tensor) -> HardNegativeBatch:
        """scores (B, n): the frozen backbone's similarity (with P) of each batch image to every base class;
        labels (B,): ground truth. L <= B·max(K, 1 + min_negatives) pairs."""
        assert scores.dim() == 2 and scores.shape == (labels.shape[0], self.n_base), scores.shape
        labels = [int(y) for y in labels.tolist()]  # (B,)
        # stable sort: ties go to the lower class index, so the choice never depends on the kernel
        ranked = torch.sort(scores.detach().float().cpu(), dim=1, descending=True, stable=True)
        top_k = ranked.indices[:, :self.topk].tolist()  # (B, K)

        # Internal filtering: a class appears at most once in the mini-batch. A repeated ground
        # truth would be a false negative in the InfoNCE (released code keeps it), so only the
        # first batch image of each class stays a positive.
        positives, pair_labels, in_batch = [], [], set()
        for i, y in enumerate(labels):
            if y not in in_batch:
                positives.append(i)
                pair_labels.append(y)
                in_batch.add(y)

        negative_images = []
        for i in positives:
            # top-K minus the ground truth, keeping K-1 (the paper; the released code keeps all K
            # when the ground truth is not in the top-K), then skip classes already in the batch.
            candidates = [c for c in top_k[i] if c != labels[i]][:self.topk - 1]
            negatives = [c for c in candidates if c not in in_batch and self.images_of_class[c]]  # pool image needed
            in_batch.update(negatives)
            # Top-up (the released code, sple_coop.py): fewer than min_negatives left after the filtering ->
            # random base classes not yet in the mini-batch, as long as there are any.
            missing = self.min_negatives - len(negatives)
            if missing > 0:
                free = [c for c in range(self.n_base) if c not in in_batch and self.images_of_class[c]]
                drawn = self.rng.sample(free, min(missing, len(free)))
                negatives += drawn
                in_batch.update(drawn)
            for c in negatives:
                pair_labels.append(c)
                negative_images.append(self.rng.choice(self.images_of_class[c]))
        return HardNegativeBatch(positives, pair_labels, negative_images)


class Step(NamedTuple):
    loss: Tensor           # () the hard-negative loss, Eq. (9), not yet back-propagated
    pairs: int             # L, the pairs of the hard-negative mini-batch
    sampler_s: float       # seconds the sampler took: ranking, drawing and rendering the negatives


def dpc_step(learner, images, labels, sampler, pool, threads, tuned_prompt, tuned_text, parallel_prompt, classnames,
             logit_scale, device) -> Step:
    """Steps 2-5 of Fig. 3 on one mini-batch (step 1, P' := P, happened once before training). images
    (B, 3, H, W) on `device`, labels (B,); tuned_text (n, E): the sampler's fixed text features of P."""
    # 2. Negative Sampler (§3.3): the frozen backbone (P) ranks all base classes for each image.
    with torch.no_grad(), prompts.substitute(learner, tuned_prompt), precision.autocast(device):
        batch_image = learner.encode_image(images)                                       # (B, E)
    t0 = time.time()   # the sampler's own work, for the progress lines: ranking, drawing, rendering negatives
    picked = sampler.sample(F.normalize(batch_image.float(), dim=-1) @ tuned_text.t(), labels)   # scores (B, n)
    negatives = data.augmented_images(pool, picked.negative_images, threads)   # [(3, H, W)]
    negatives = torch.stack(negatives).to(device) if negatives else None                 # (L - B', 3, H, W)
    pair_labels = torch.tensor(picked.pair_labels)                                        # (L,), on the CPU
    sampler_s = time.time() - t0

    # 3. The parallel prompt P' in every forward (its step: main, docs/differences.md #6).
    with prompts.substitute(learner, parallel_prompt), precision.autocast(device):
        if learner.image_side:
            pair_images = images[picked.positives] if negatives is None else torch.cat([images[picked.positives], negatives])
            image_features = learner.encode_image(pair_images)                           # (L, E)
        else:  # f(V) has no prompt (CoOp): the sampler's features of the positives serve as they are
            image_features = batch_image[picked.positives]                               # (B', E)
            if negatives is not None:   # no forward on an empty batch (CUDA's attention kernels refuse it)
                with torch.no_grad():
                    image_features = torch.cat([image_features, learner.encode_image(negatives)])   # (L, E)
        text_features = learner.encode_text(classnames)                                  # (n, E)
    # 4. Feature Filtering, Eq. (6)-(8): ĝ(C) of all n base classes, then g(C') = Q · ĝ(C).
    pair_text = filter_features(text_features, pair_labels)                              # (L, E)
    # 5. Hard Negative Optimizing, Eq. (9)-(11): the only loss of this stage.
    return Step(hard_negative_loss(image_features, pair_text, logit_scale), len(pair_labels), sampler_s)


def learner_loss_step(learner, images, labels, parallel_prompt, classnames, device) -> Step:
    """Tab. 3 rows (3)-(4), --loss learner: P' trained with the learner's own loss (CoOp: Eq. 3), no sampler."""
    with prompts.substitute(learner, parallel_prompt), precision.autocast(device):
        loss = learner.training_loss(images, labels, classnames)["loss"]
    return Step(loss, images.shape[0], 0.0)


# ---------------------------------------------------------------------------------------------
# Arguments

def get_args(argv=None):
    p = command_line.Parser(description="DPC stage 2 (paper §3.2-3.4)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default=None, help="stage-1 run folder (default: the last train_backbone.py run)")
    p.add_argument("--topk", type=int, default=8, help="K of the Negative Sampler (paper §4.1: K = 8)")
    p.add_argument("--batch-size", type=int, default=4, help="b (paper §4.1: 4, so b·K = 32 as the backbone's batch)")
    p.add_argument("--epochs", type=int, default=20,
                   help="DPC epochs (the released configs: 20 for every learner; Tab. 5 varies it, e.g. --epochs 10)")
    p.add_argument("--lr", type=float, default=0.002, help="SGD lr (released DPC configs), same schedule as the backbone")
    p.add_argument("--parallel-step", default="released", choices=("released", "paper"),
                   help="how P' moves: released = P' <- P' - lr·(∂L/∂P'/ω_b + wd·P') on the tensors the released code "
                        "decouples (docs/differences.md #6); paper = plain SGD on P' at lr")
    p.add_argument("--omega-b", type=float, default=None, help="ω_b in (0, 1] (paper §4.1: 0.2; MaPLe 1.0)")
    p.add_argument("--omega-n", type=float, default=1e-6, help="ω_n in [0, 1] (paper §4.1: 1e-6)")
    p.add_argument("--base-inference", default="parallel", choices=BASE_INFERENCE_CHOICES,
                   help="base classes use P' (parallel: the released code, the paper's numbers) or P̃_b (mixed: Eq. 12)")
    p.add_argument("--loss", default="hard-negative", choices=("hard-negative", "learner"), help="what trains P': "
                   "DHNO's hard-negative InfoNCE (Eq. 9-11), or the learner's own loss on the few-shot batch (Tab. 3 rows 3-4)")
    p.add_argument("--negative-pool", default="fewshot", choices=("fewshot", "full"),
                   help="where negative images come from: the few-shot base train set, or the full base train split")
    p.add_argument("--min-negatives", type=int, default=2,
                   help="top-up: random base classes not yet in the mini-batch for an image left with fewer hard "
                        "negatives (the released code: 2; 0 = hard negatives only; docs/differences.md #7)")
    p.add_argument("--shots", type=int, default=16, help="few-shot base train set (also for a PromptKD backbone, paper §4.1)")
    p.add_argument("--seed", type=int, default=None, help="default: the backbone's seed")
    backbones.add_backbone_flags(p)   # --data, --root, --clip, --teacher, --teacher-clip: the backbone's unless given
    p.add_argument("--output-dir", default=None, help="run folder (default output/<data>/<learner>_dpc/seed<seed>)")
    command_line.add_run_flags(p)
    args = p.parse_args(argv)
    command_line.check_positive(args, "epochs", "batch_size", "lr")
    command_line.check_shots(args.shots)
    command_line.check_run_flags(args)
    check_topk(args.topk, max(args.topk, 2))  # K < 2 fails before anything is loaded or written
    if args.min_negatives < 0:
        raise DPCError(f"--min-negatives must be 0 or more (0 = hard negatives only); got {args.min_negatives}")
    return args


# ---------------------------------------------------------------------------------------------
# Training loop (Fig. 3)

def main(args):
    # Stage 1 hands over P's learner and the settings it was trained with: DPC continues on its data, root,
    # seed and classes. Set on args, they are recorded in args.json, and --resume compares them.
    learner, backbone, inherited = backbones.dpc_stage1(args)
    vars(args).update(inherited)   # backbone, learner, clip (+ clip_digest), data, root, seed, subsample, teacher(_clip)
    args.omega_b = (1.0 if args.learner == "maple" else 0.2) if args.omega_b is None else args.omega_b
    check_omegas(args.omega_b, args.omega_n)
    args.output_dir = args.output_dir or os.path.join("output", args.data, f"{args.learner}_dpc", f"seed{args.seed}")
    command_line.check_not_a_source(args.output_dir, backbone=args.backbone, teacher=args.teacher)
    previous = command_line.check_run_folder(args, "dpc")
    splits = data.load_splits(args.data, args.root, args.shots, args.seed)
    data.check_halves(splits, args.data, args.subsample)
    train_items = splits[args.subsample]["train"]
    classnames = data.classnames_of(train_items)                      # the n base classes
    backbones.check_backbone_classes(backbone, classnames, args)
    prompts.check_classnames(learner, data.classnames_of(splits["all"]["train"]), training=args.loss == "learner")
    train_images = data.train_set(train_items, learner.clip.visual.input_resolution)   # decoded once, here
    pool = train_items if args.negative_pool == "fewshot" else data.subsample(splits["unsampled"], args.subsample)["train"]
    pool_images = train_images if args.negative_pool == "fewshot" else data.train_set(pool, train_images.transform.size)
    topk = check_topk(args.topk, len(classnames))
    run_folder.check_disk(args.output_dir, list(prompts.prompt_tensors(learner).values()) * 2)   # P and P' are both saved
    run_folder.start_run(args)
    if topk < args.topk:
        log(f"warning: --topk {args.topk} > {len(classnames)} base classes; using K = {topk}")
    sampler = NegativeSampler([item.label for item in pool], len(classnames), topk, args.seed, args.min_negatives)
    logit_scale = learner.clip.logit_scale.exp().item()               # s = 1/τ = 100, frozen
    learner.eval()  # BN statistics of P stay P's (PromptKD's projector); CLIP has no dropout

    # 1. Dual prompt initialisation. Eq. (5): P' := P, with P frozen. SGD trains P' itself; the released code names
    # its parameter P̃_b and decouples it in every forward, which moves P' the same way once the gradient of the
    # tensors it decouples is scaled by 1/ω_b (scale_released_gradients; --parallel-step paper: none is).
    tuned_prompt = {n: t.detach().clone().requires_grad_(False) for n, t in prompts.prompt_tensors(learner).items()}
    parallel_prompt = initial_parallel_prompt(tuned_prompt)
    optimizer = torch.optim.SGD(parallel_prompt.values(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scaled = released_step_tensors(args.learner, parallel_prompt) if args.parallel_step == "released" else []
    scaler = precision.grad_scaler(args.device)   # fp16 autocast only (GPUs without bf16), as in stage 1
    start_epoch = 1 if previous is None else previous["epoch"] + 1
    if previous is not None:
        path = os.path.join(args.output_dir, "checkpoint.pt")
        _check_same_tensors(previous["parallel_prompt"], tuned_prompt, f"the parallel prompt of {path}")
        with torch.no_grad():
            for n, p in parallel_prompt.items():
                p.copy_(previous["parallel_prompt"][n])
        checkpoints.load_optimizer_state(optimizer, previous["optimizer"], path)
        checkpoints.load_scaler_state(scaler, previous)   # fp16: the loss scale it had, not 2^16 again
        log(f"resuming after epoch {previous['epoch']}")
    log(f"DPC on {args.learner} backbone {args.backbone}: P = {len(tuned_prompt)} tensors, "
        f"{sum(t.numel() for t in tuned_prompt.values()):,} values; b = {args.batch_size}, K = {topk}, "
        f"ω_b = {args.omega_b}, ω_n = {args.omega_n}, base inference {args.base_inference}, loss {args.loss}; "
        f"P' step {args.parallel_step} (lr/ω_b on {len(scaled)} of {len(parallel_prompt)} tensors); {len(train_items)} train "
        f"images, negatives from {len(pool)} ({args.negative_pool}), at least {args.min_negatives} per image")

    # The sampler's frozen text features of P over all base classes never change: computed once.
    with torch.no_grad(), prompts.substitute(learner, tuned_prompt), precision.autocast(args.device):
        tuned_text = F.normalize(learner.encode_text(classnames).float(), dim=-1)   # (n, E)

    threads = ThreadPoolExecutor(args.workers) if args.workers > 0 else None   # renders the negatives
    for epoch in range(start_epoch, args.epochs + 1):
        torch.manual_seed(args.seed * 1000 + epoch)     # a resumed run replays exactly this epoch
        sampler.rng.seed(args.seed * 1000 + epoch)
        loader = data.make_loader(train_images, args.batch_size, True, args.workers,
                                  seed=args.seed * 1000 + epoch, drop_last=True, pin=args.device.startswith("cuda"))
        lr = lr_at(epoch, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        progress = run_folder.Progress(epoch, args.epochs, len(loader), args.print_every, fix="lower --lr or raise --omega-b")
        t_sampler, pairs = 0.0, 0
        for it, (images, labels, _) in enumerate(loader, 1):
            progress.waited()
            images = images.to(args.device, non_blocking=True)
            if args.loss == "hard-negative":
                step = dpc_step(learner, images, labels, sampler, pool_images, threads, tuned_prompt, tuned_text,
                                parallel_prompt, classnames, logit_scale, args.device)
            else:  # --loss learner, Tab. 3 rows (3)-(4)
                step = learner_loss_step(learner, images, labels.to(args.device), parallel_prompt, classnames, args.device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(step.loss).backward()
            # The released step: P' <- P' - lr·(∂L/∂P'/ω_b + wd·P'), momentum 0.9 (docs/differences.md #6)
            scale_released_gradients(parallel_prompt, scaled, args.omega_b)
            scaler.step(optimizer)
            scaler.update()
            pairs += step.pairs
            t_sampler += step.sampler_s
            progress.done(it, lambda s: f"loss {step.loss.item():.4f} lr {lr:.2e} L {pairs / it:.1f} "
                                        f"{pairs / s:.1f} pairs/s sampler {100 * t_sampler / s:.0f}%", step.loss)
        run_folder.check_diverged(parallel_prompt, epoch)
        run_folder.save_atomic(checkpoints.dpc_checkpoint(args, backbone, classnames, tuned_prompt, parallel_prompt, epoch, optimizer,
                                                 False, scaler), os.path.join(args.output_dir, "checkpoint.pt"))
    if threads is not None:
        threads.shutdown()

    results = evaluate_dpc(learner, splits, tuned_prompt, parallel_prompt, args)
    scoring.log_results(results, f"{args.learner} + DPC")
    run_folder.save_atomic(checkpoints.dpc_checkpoint(args, backbone, classnames, tuned_prompt, parallel_prompt, args.epochs, optimizer,
                                             True, scaler), os.path.join(args.output_dir, "checkpoint.pt"))
    run_folder.write_json_atomic(dict(results, kind="dpc", learner=args.learner, data=args.data, seed=args.seed,
                                  omega_b=args.omega_b, omega_n=args.omega_n, base_inference=args.base_inference,
                                  loss=args.loss, topk=topk, epochs=args.epochs, parallel_step=args.parallel_step,
                                  min_negatives=args.min_negatives, backbone=os.path.abspath(args.backbone)),
                             os.path.join(args.output_dir, "results.json"))
    return results


def inference_prompts(parallel_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor], omega_b: float,
                      omega_n: float, base_inference: str) -> tuple[dict, dict]:
    """Weighting-Decoupling at inference (Fig. 4): (base-class prompt, P̃_n) from the trained P' and the frozen P.
    An inference ω_b (evaluate.py --omega-b, Fig. 6a) moves only the "mixed" base prompt, never P' or P̃_n."""
    return (base_class_prompt(parallel_prompt, tuned_prompt, omega_b, base_inference),
            new_class_prompt(parallel_prompt, tuned_prompt, omega_n))   # Eq. (12) / Eq. (13)


def evaluate_dpc(learner, splits, tuned_prompt, parallel_prompt, args) -> dict:
    """Base accuracy with the base-class prompt, new accuracy with P̃_n (inference_prompts)."""
    with torch.no_grad():
        base_prompt, new_prompt = inference_prompts(parallel_prompt, tuned_prompt, args.omega_b, args.omega_n,
                                                    args.base_inference)
    return scoring.base_to_new(learner, splits, args.device, args.workers, base_prompt, new_prompt,
                               getattr(args, "subsample", "base"), args.feature_cache)


def run(argv=None):
    return command_line.run_cli(main, get_args, argv)


if __name__ == "__main__":
    run()
