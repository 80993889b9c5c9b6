"""DPC stage 2: tune a parallel prompt P' next to a frozen tuned prompt P on the base classes.

DPC = Dual-Prompt Collaboration for tuning CLIP (Li et al., CVPR 2025), paper §3.2-3.4 and Fig. 3.
Stage 1 (train_backbone.py) gives the tuned prompt P. This script freezes P, trains P' with the
Dynamic Hard Negative Optimizer (§3.3: negative sampler, feature filtering, symmetric InfoNCE) and
combines the two prompts with the Weighting-Decoupling module (§3.4) for base and new inference.

Glossary (paper symbol -> name in this file)
  P       tuned_prompt      frozen named tensors of the stage-1 learner (spec/DECISIONS.md #9)
  P'      parallel_prompt   = F⁻¹(P̃_b), what the hard-negative loss optimises (Eq. 5: P' := P at start)
  P̃_b     mixed_prompt      the trainable tensors, ω_b P' + (1-ω_b) P (Eq. 12, DECISIONS #10)
  P̃_n     new_class_prompt  ω_n P' + (1-ω_n) P, used for new classes (Eq. 13)
  ω_b/ω_n omega_b/omega_n   --omega-b / --omega-n
  K       topk              top-K classes the frozen backbone (with P) ranks first; K-1 are negatives
  Q       selection_matrix  one-hot L×n matrix picking the mini-batch's text rows (Eq. 8)
  s = 1/τ logit_scale       CLIP's exp(logit_scale) = 100

Shape letters: B batch (the paper's b), n base classes, L pairs in the hard-negative mini-batch
(L <= B·K), E embedding width, K top-K.

Usage:
  python train_dpc.py --topk 8
"""

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DPCError(ValueError):
    """A bad flag or mismatched prompt tensors; the one-line message says what to change."""


# ---------------------------------------------------------------------------------------------
# argument checks

def check_omegas(omega_b: float, omega_n: float) -> None:
    """ω_b divides in F⁻¹, so 0 must be refused here (the released code has no guard at ω_b = 0)."""
    if not 0.0 < omega_b <= 1.0:  # `not` form also rejects NaN
        raise DPCError(f"--omega-b must be in (0, 1] (Decoupling divides by it); got {omega_b}")
    if not 0.0 <= omega_n <= 1.0:
        raise DPCError(f"--omega-n must be in [0, 1] (0 = new classes use the tuned prompt P only); "
                       f"got {omega_n}")


def check_topk(topk: int, n_base: int) -> int:
    """Return the K to use. K > n_base is clamped (EuroSAT has 5 base classes; the released code
    crashes in topk there) with one warning line; K < 2 leaves no hard negative, so it is an error."""
    if n_base < 2:
        raise DPCError(f"DPC needs at least 2 base classes to build hard negatives; got {n_base}")
    if topk < 2:
        raise DPCError(f"--topk must be at least 2 (the ground truth plus one hard negative); got {topk}")
    if topk > n_base:
        print(f"warning: --topk {topk} > {n_base} base classes; using K = {n_base}")
        return n_base
    return topk


# ---------------------------------------------------------------------------------------------
# Weighting-Decoupling module (§3.4, Fig. 4)
# Every prompt is a dict {name: tensor} over the same names as the stage-1 learner's trainable
# tensors (DECISIONS #9), so one function covers text context, deep prompts, projectors, ...

def _check_same_tensors(a: dict, b: dict, what: str) -> None:
    """Mixing only makes sense tensor by tensor; a name or shape mismatch means a wrong checkpoint."""
    if a.keys() != b.keys():
        missing, extra = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
        raise DPCError(f"{what} and tuned_prompt hold different tensors (missing {missing}, extra {extra})")
    for name, x in a.items():
        if x.shape != b[name].shape:
            raise DPCError(f"{what}[{name!r}] has shape {tuple(x.shape)} but tuned_prompt has "
                           f"{tuple(b[name].shape)}")
        if not (x.is_floating_point() and b[name].is_floating_point()):
            raise DPCError(f"{what}[{name!r}] is not a floating-point tensor; only float tensors can be mixed")


def weighting(parallel_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor], omega_b: float) -> dict:
    """F: combine the dual prompts into the mixed prompt for base classes.
    Written as ω_b P' + (1-ω_b) P (not P + ω_b (P' - P)) so that ω_b = 1 gives P' bitwise."""
    _check_same_tensors(parallel_prompt, tuned_prompt, "parallel_prompt")
    # Eq. (12): P̃_b = F(P') = ω_b P' + (1 - ω_b) P
    return {k: omega_b * parallel_prompt[k] + (1.0 - omega_b) * tuned_prompt[k] for k in tuned_prompt}


def decoupling(mixed_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor], omega_b: float) -> dict:
    """F⁻¹: recover P' from the trainable mixed prompt; every forward goes through this, so the
    gradient reaching P̃_b is (1/ω_b)·∂loss/∂P' (DECISIONS #10: like training P' at lr/ω_b²).
    (P̃_b - (1-ω_b) P)/ω_b is computed in the algebraically equal form P + (P̃_b - P)/ω_b: at
    initialisation P̃_b = P, so P' = P bitwise and step 0 reproduces the backbone exactly."""
    _check_same_tensors(mixed_prompt, tuned_prompt, "mixed_prompt")
    # F⁻¹ of Eq. (12), used in Eq. (13): P' = (P̃_b - (1 - ω_b) P) / ω_b = P + (P̃_b - P) / ω_b
    return {k: tuned_prompt[k] + (mixed_prompt[k] - tuned_prompt[k]) / omega_b for k in tuned_prompt}


def new_class_prompt(mixed_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor],
                     omega_b: float, omega_n: float) -> dict:
    """P̃_n for new classes: mostly the tuned prompt P, which holds the backbone's generalisation.
    With ω_n = 0.0 this is 0·P' + 1·P, which is P bitwise for finite P', so new-class accuracy
    equals the backbone's exactly (the paper's tables show identical new accuracy)."""
    parallel_prompt = decoupling(mixed_prompt, tuned_prompt, omega_b)
    # Eq. (13): P̃_n = ω_n F⁻¹(P̃_b) + (1 - ω_n) P
    return {k: omega_n * parallel_prompt[k] + (1.0 - omega_n) * tuned_prompt[k] for k in tuned_prompt}


BASE_INFERENCE_CHOICES = ("parallel", "mixed")


def base_class_prompt(mixed_prompt: dict[str, Tensor], tuned_prompt: dict[str, Tensor],
                      omega_b: float, base_inference: str) -> dict:
    """The prompt for base-class inference (DECISIONS #10).
    "parallel" (default): P' = F⁻¹(P̃_b), what the released code evaluates and what produced the
    paper's numbers. "mixed": P̃_b itself = ω_b P' + (1-ω_b) P, the literal reading of Eq. (12)."""
    if base_inference == "parallel":
        return decoupling(mixed_prompt, tuned_prompt, omega_b)
    if base_inference == "mixed":
        _check_same_tensors(mixed_prompt, tuned_prompt, "mixed_prompt")
        return dict(mixed_prompt)  # Eq. (12): P̃_b, already stored in this form
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
    """Text features of the L pairs, taken from the features of ALL n base classes under P'.
    Normalising over all n first keeps the base-class feature distribution the one P' is judged on
    (§3.3). Done in fp32 with autocast off: a bf16 matmul would round the selected rows."""
    n = text_features.shape[0]
    with torch.autocast(device_type=text_features.device.type, enabled=False):
        text_features = text_features.float()  # (n, E)
        # Eq. (6): ĝ(C) = g(C) / ||g(C)||_2 ∈ R^{n×E}
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)  # (n, E)
        q = selection_matrix(labels.to(text_features.device), n)  # (L, n)
        # Eq. (7): g(C') = Q · ĝ(C)
        return q @ text_features  # (L, n) @ (n, E) -> (L, E)


def hard_negative_loss(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """Symmetric image-text InfoNCE over the L×L matrix of the hard-negative mini-batch; pair j is
    (image j, text j), every other row/column is a hard negative.

    Normalisation: ½ [CE(logits, arange L) + CE(logitsᵀ, arange L)], each CE a mean over L. Eq. (9)
    is -(1/L) Σ_j (log p(y|C'_j) + log p(y|V'_j)) = CE_img + CE_txt, i.e. twice this value. We keep
    the released code's ½ so the loss is on the scale of one cross-entropy and its lr (0.002)
    carries over. Eq. (10) as printed sums the diagonal in its denominator; we read it, as the
    released code does, as the usual softmax over the L texts (and Eq. 11 over the L images).
    text_features must already be unit rows (filter_features); images are normalised here. The
    product runs in fp32 with autocast off: at s = 100 a bf16 cosine is off by up to ~0.4 logits."""
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
# Negative sampler (§3.3, DECISIONS #11)

class HardNegativeBatch(NamedTuple):
    """What the sampler picked; the caller loads the images. Pair j of the L pairs has class
    pair_labels[j] and image: batch image positives[j] for j < len(positives), else pool image
    negative_images[j - len(positives)]."""
    positives: list[int]        # indices into the batch of the kept positive images
    pair_labels: list[int]      # (L,) positives' classes first, then each positive's negatives in turn
    negative_images: list[int]  # (L - len(positives),) indices into the pool, one per negative class


class NegativeSampler:
    """Builds the hard-negative mini-batch from labels and indices only (no images, no model), so it
    is deterministic given its seed and inputs and its RNG state can be checkpointed.

    pool_labels[j] is the base-class label of image j of the pool negatives are drawn from: the
    few-shot base train set by default, or the full base train split. Never val/test, never a new
    class: the scores only cover the n base classes."""

    def __init__(self, pool_labels: list[int], n_base: int, topk: int, seed: int):
        if not 2 <= topk <= n_base:
            raise DPCError(f"topk {topk} must be in [2, {n_base}]; pass it through check_topk first")
        bad = sorted({int(y) for y in pool_labels if not 0 <= int(y) < n_base})
        if bad:
            raise DPCError(f"negative pool has labels {bad[:5]} outside the {n_base} base classes")
        self.n_base, self.topk = n_base, topk
        self.images_of_class = [[] for _ in range(n_base)]  # class -> pool indices, in pool order
        for j, y in enumerate(pool_labels):
            self.images_of_class[int(y)].append(j)
        self.rng = random.Random(seed)  # own stream: independent of torch/global seeding and of workers

    def sample(self, scores: Tensor, labels: Tensor) -> HardNegativeBatch:
        """scores (B, n): the frozen backbone's similarity (with P) of each batch image to every base
        class; labels (B,): ground truth. Returns a HardNegativeBatch with L <= B·K pairs."""
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
            for c in candidates:
                if c in in_batch or not self.images_of_class[c]:  # no pool image: cannot pair it
                    continue
                pair_labels.append(c)
                in_batch.add(c)
                negative_images.append(self.rng.choice(self.images_of_class[c]))
        return HardNegativeBatch(positives, pair_labels, negative_images)

    def state_dict(self) -> dict:
        """The RNG state, saved with the checkpoint so a resumed run draws the same negatives."""
        return {"rng_state": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))  # tuple(): also accepts a JSON round trip


# ---- training loop (added later) ----
