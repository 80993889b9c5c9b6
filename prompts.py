"""The four prompt learners DPC is plugged into: CoOp, MaPLe, PromptSRC and PromptKD.

Each learner wraps a frozen CLIP (clip_model.py) and owns only its prompt tensors. They share one
small interface, which is all that train_backbone.py, train_dpc.py and evaluate.py use:

    learner.encode_text(classnames)      -> (C, E) text features g(P_t, C)      (unnormalised)
    learner.encode_image(images)         -> (B, E) image features f(P_v, V)     (unnormalised)
    learner(images, classnames)          -> (B, C) logits, Eq. (4)
    learner.training_loss(images, labels, classnames) -> dict(loss=..., logits=..., <terms>)
    learner.image_side                   -> name prefixes of the tensors f(V) reads (() for CoOp)
    prompt_tensors(learner)              -> {name: tensor}: the tuned prompt P of DPC (Eq. 5)
    learner_state(learner) / load_learner_state(learner, state): the small checkpoint

DPC (train_dpc.py) runs a learner with other values for its prompt tensors inside
`with substitute(learner, values):`, so it never reaches into a learner. A fifth learner is one
class below plus one entry in LEARNERS (and build_learner if it needs extra arguments).

Glossary (paper symbol -> code)
    P_t, text context [p]_1..[p]_M (Eq. 2)  -> `ctx` (M, D_t)
    deep text prompts (blocks 1..depth-1)   -> `text_deep[i]` (M, D_t)         (MaPLe: `compound_prompts_text`)
    P_v, visual prompts                     -> `visual_prompt` (M, D_v) and `visual_deep[i]`
    MaPLe's text->vision coupling           -> `proj`, `compound_prompt_projections[i]`
    PromptKD's student projector            -> `projector` (Linear-BN-ReLU-Linear)
    s = 1/τ (Eq. 1), frozen at 100          -> `clip.logit_scale.exp()`
Shape letters: B images, C classes, D width of a tower (D_t text, D_v vision), E joint embedding width,
M context tokens; 77 is CLIP's context length in tokens (train_dpc.py uses K for top-K, L for pairs).

Sources: the original repositories (CoOp ff61507c, multimodal-prompt-
learning 69bce21a, PromptSRC bb95c77b, PromptKD ec244f78); the structure, initialisation and
losses follow them; they ran in pure fp16, we run fp32 / autocast (docs/differences.md #1).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from clip_model import tokenize, tokenizer


# ================================================================================================
# Shared text-prompt mechanics (CoOp, MaPLe, PromptSRC; PromptKD's teacher)
# ================================================================================================

def class_prompts(clip, classnames, prefix: str, cache: dict):
    """Tokens (C, 77), frozen token embeddings (C, 77, D_t) of "<prefix> <class name>." and the length T up to
    the longest EOT (counted on the CPU once, so the text tower never waits for the GPU to learn it).

    The learnable context later overwrites positions 1..M, so the class name sits at the end
    (CoOp's class_token_position "end"). Cached per class list: tokenizing is the slow part.
    """
    key = (prefix, tuple(classnames))
    if key not in cache:
        texts = [prompt_text(prefix, name) for name in classnames]
        tokens = tokenize(texts)
        length = int(tokens.argmax(dim=-1).max()) + 1                    # EOT, the largest id, ends each row
        tokens = tokens.to(clip.positional_embedding.device)
        with torch.no_grad():
            cache[key] = (tokens, clip.token_embeddings(tokens), length)
    return cache[key]


def prompt_text(prefix: str, classname: str) -> str:
    """The class prompt "<prefix> <class name>." that the learners tokenize ("_" read as a space)."""
    return f"{prefix} {classname.replace('_', ' ')}."


def encode_prompted_text(clip, ctx, classnames, prefix, cache, deep_prompts=()):
    """g(P_t): [SOT][ctx_1..ctx_M][rest of prefix][class name][.][EOT] -> (C, E)."""
    tokens, embeddings, length = class_prompts(clip, classnames, prefix, cache)   # (C, 77), (C, 77, D_t), T
    c, m = embeddings.shape[0], ctx.shape[0]
    # Eq. (2): P = [p]_1 [p]_2 ... [p]_M [CLASS], the context in front of each class name
    x = torch.cat([embeddings[:, :1], ctx.to(embeddings.dtype).expand(c, -1, -1), embeddings[:, 1 + m:]], dim=1)
    return clip.encode_text_embeddings(x, tokens, deep_prompts, length=length)


def init_context(clip, n_ctx: int, ctx_init: str):
    """Context vectors and the prompt prefix text.

    With an init phrase the context is the phrase's first n_ctx token embeddings and the prefix
    keeps the WHOLE phrase (MaPLe's 2 tokens of "a photo of a" leave "of a" as frozen words);
    without one, N(0, 0.02²) vectors behind an "X X .. X" prefix.
    """
    width = clip.ln_final.weight.shape[0]
    if ctx_init:
        tokens = tokenize(ctx_init).to(clip.positional_embedding.device)
        n_words = len(tokenizer().encode(ctx_init))
        if n_ctx > n_words:
            raise LearnerError(f"--n-ctx {n_ctx} is longer than the {n_words} tokens of '{ctx_init}'")
        with torch.no_grad():
            ctx = clip.token_embeddings(tokens)[0, 1:1 + n_ctx].clone().float()   # (M, D_t)
        return nn.Parameter(ctx), ctx_init
    return nn.Parameter(torch.randn(n_ctx, width) * 0.02), " ".join(["X"] * n_ctx)


def deep_prompts(n: int, m: int, width: int):
    """n per-block prompts (M, D), N(0, 0.02²), for blocks 1..n (depth = n + 1)."""
    return nn.ParameterList([nn.Parameter(torch.randn(m, width) * 0.02) for _ in range(n)])


def cosine_logits(image_features, text_features, logit_scale):
    """Eq. (4): s · cos(f(P_v, V), g(P_t)) -> (B, C), in fp32 whatever the towers ran in (scaled_dot)."""
    return scaled_dot(F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1),
                      logit_scale)


def scaled_dot(image, text, logit_scale):
    """s · image textᵀ of unit rows (B, E), (C, E) -> (B, C) in fp32 with autocast off. Under bf16 autocast the
    product would keep ~3 significant digits: cosines 0.3019 and 0.3025 both become 0.3027, a tie argmax
    breaks towards the lower class, and at s = 100 a logit moves by up to ~0.4 (docs/differences.md #16)."""
    with torch.autocast(image.device.type, enabled=False):
        return logit_scale * image.float() @ text.float().t()


# ================================================================================================
# CoOp — Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022
# ================================================================================================

class CoOp(nn.Module):
    """CoOp: one shared text context in front of the class name; the image encoder stays plain.

    Trainable: `ctx` (M, D_t), M = 4 from "a photo of a" (2,048 values on ViT-B/16). Loss: Eq. (3).
    """
    DEFAULTS = dict(epochs=20, lr=0.002, batch_size=32,
                    source="lr: CoOp vit_b16_ctxv1; 20 epochs: DPC paper Tab. 5; batch 32: DPC paper §4.1")
    image_side = ()  # f(V) reads no prompt tensor: DPC reuses image features, evaluation caches them

    def __init__(self, clip, n_ctx: int = 4, ctx_init: str = "a photo of a"):
        super().__init__()
        self.clip = clip
        if ctx_init:  # CoOp derives the context length from the init phrase
            n_ctx = len(tokenizer().encode(ctx_init))
        self.ctx, self.prefix = init_context(clip, n_ctx, ctx_init)
        self.cache = {}

    def encode_text(self, classnames):
        return encode_prompted_text(self.clip, self.ctx, classnames, self.prefix, self.cache)

    def encode_image(self, images):
        return self.clip.encode_image(images)

    def forward(self, images, classnames):
        return cosine_logits(self.encode_image(images), self.encode_text(classnames), self.clip.logit_scale.exp())

    def training_loss(self, images, labels, classnames):
        image, text = self.encode_image(images), self.encode_text(classnames)          # (B, E), (C, E)
        logits = cosine_logits(image, text, self.clip.logit_scale.exp())               # (B, C)
        return dict(loss=F.cross_entropy(logits, labels), logits=logits,               # Eq. (3)
                    image_features=image, text_features=text)


# ================================================================================================
# MaPLe — Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023
# ================================================================================================

class MaPLe(nn.Module):
    """MaPLe: text prompts at depth 9, visual prompts are linear maps of them (text -> vision coupling).

    Trainable: `ctx` (2, D_t) from "a photo" (the words "of a" stay frozen tokens); `proj`
    Linear(D_t -> D_v) giving the layer-0 visual prompts; `compound_prompts_text[i]` (2, D_t) for
    blocks 1..8, N(0, 0.02²); `compound_prompt_projections[i]` Linear(D_t -> D_v), all eight starting
    from the same weights. 3,555,072 values on ViT-B/16. Loss: cross-entropy.
    """
    DEFAULTS = dict(epochs=5, lr=0.0035, batch_size=32,
                    source="epochs/lr: MaPLe vit_b16_c2_ep5_batch4_2ctx; batch 32: DPC paper §4.1")

    image_side = ("ctx", "proj.", "compound_prompts_text.", "compound_prompt_projections.")  # f(V) reads every tensor

    def __init__(self, clip, n_ctx: int = 2, ctx_init: str = "a photo of a", depth: int = 9):
        super().__init__()
        self.clip = clip
        d_text, d_vision = clip.ln_final.weight.shape[0], clip.visual.conv1.weight.shape[0]
        # MaPLe's rule: the phrase initialises the context only when n_ctx <= 4, else N(0, 0.02²)
        self.ctx, self.prefix = init_context(clip, n_ctx, ctx_init if n_ctx <= 4 else "")
        self.proj = nn.Linear(d_text, d_vision)
        self.compound_prompts_text = deep_prompts(depth - 1, n_ctx, d_text)
        coupling = nn.Linear(d_text, d_vision)  # one fresh init, copied: the maps start identical
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(d_text, d_vision) for _ in range(depth - 1)])
        for layer in self.compound_prompt_projections:
            layer.load_state_dict(coupling.state_dict())
        self.cache = {}

    def encode_text(self, classnames):
        return encode_prompted_text(self.clip, self.ctx, classnames, self.prefix, self.cache,
                                    list(self.compound_prompts_text))

    def encode_image(self, images):
        visual_prompt = self.proj(self.ctx)                                   # (M, D_v)
        visual_deep = [layer(p) for layer, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return self.clip.encode_image(images, visual_prompt, visual_deep)

    def forward(self, images, classnames):
        return cosine_logits(self.encode_image(images), self.encode_text(classnames), self.clip.logit_scale.exp())

    def training_loss(self, images, labels, classnames):
        image, text = self.encode_image(images), self.encode_text(classnames)          # (B, E), (C, E)
        logits = cosine_logits(image, text, self.clip.logit_scale.exp())               # (B, C)
        return dict(loss=F.cross_entropy(logits, labels), logits=logits,               # Eq. (3)
                    image_features=image, text_features=text)


# ================================================================================================
# PromptSRC — Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without
# Forgetting", ICCV 2023
# ================================================================================================

# "a photo of a {}." then the first 59 of CLIP's 80 ImageNet templates without it (PromptSRC's list).
PROMPTSRC_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
]


class PromptSRC(nn.Module):
    """PromptSRC: independent text and visual prompts (IVLP, 4 + 4 tokens, depth 9) regularised
    towards frozen CLIP.

    Trainable: `ctx` (4, D_t) from "a photo of a"; `text_deep[i]` (4, D_t), blocks 1..8;
    `visual_prompt` (4, D_v) appended after the patch tokens; `visual_deep[i]` (4, D_v), blocks
    1..8. 46,080 values on ViT-B/16. Loss: CE + 25·L1(text) + 10·L1(image) + KL(zero-shot ‖ prompted)
    / (B·C) against frozen CLIP (PromptSRC §3.2); Gaussian prompt aggregation in train_backbone.py.
    """
    DEFAULTS = dict(epochs=20, lr=0.0025, batch_size=32,
                    source="epochs/lr: PromptSRC vit_b16_c2_ep20_batch4_4+4ctx; batch 32: DPC paper §4.1")

    image_side = ("visual_prompt", "visual_deep.")  # what f(V) reads (image_side_tensors)

    def __init__(self, clip, n_ctx_text: int = 4, n_ctx_vision: int = 4, depth_text: int = 9,
                 depth_vision: int = 9, ctx_init: str = "a photo of a", text_weight: float = 25.0,
                 image_weight: float = 10.0):
        super().__init__()
        self.clip = clip
        d_text, d_vision = clip.ln_final.weight.shape[0], clip.visual.conv1.weight.shape[0]
        self.ctx, self.prefix = init_context(clip, n_ctx_text, ctx_init if n_ctx_text <= 4 else "")
        self.text_deep = deep_prompts(depth_text - 1, n_ctx_text, d_text)
        self.visual_prompt = nn.Parameter(torch.randn(n_ctx_vision, d_vision) * 0.02)
        self.visual_deep = deep_prompts(depth_vision - 1, n_ctx_vision, d_vision)
        self.text_weight, self.image_weight = text_weight, image_weight
        self.cache, self.fixed_cache = {}, {}

    def encode_text(self, classnames):
        return encode_prompted_text(self.clip, self.ctx, classnames, self.prefix, self.cache, list(self.text_deep))

    def encode_image(self, images):
        return self.clip.encode_image(images, self.visual_prompt, list(self.visual_deep))

    def forward(self, images, classnames):
        return cosine_logits(self.encode_image(images), self.encode_text(classnames), self.clip.logit_scale.exp())

    @torch.no_grad()
    def fixed_text_features(self, classnames):
        """Frozen CLIP's text target: mean of the UNNORMALISED features over the 60 templates (C, E).

        fp32 even when first asked for under autocast: PromptSRC builds it with a separate fp32 CLIP,
        and this cached target then serves the whole run."""
        key = tuple(classnames)
        if key not in self.fixed_cache:
            with torch.autocast(self.ctx.device.type, enabled=False):
                per_template = [self.clip.encode_text(tokenize([t.format(c.replace("_", " ")) for c in classnames])
                                                      .to(self.ctx.device)) for t in PROMPTSRC_TEMPLATES]
            self.fixed_cache[key] = torch.stack(per_template).float().mean(dim=0)    # (C, E)
        return self.fixed_cache[key]

    def training_loss(self, images, labels, classnames):
        scale = self.clip.logit_scale.exp()
        text_features, image_features = self.encode_text(classnames), self.encode_image(images)
        text = F.normalize(text_features, dim=-1)                                   # (C, E)
        image = F.normalize(image_features, dim=-1)                                 # (B, E)
        logits = scaled_dot(image, text, scale)                                     # (B, C), fp32
        with torch.no_grad():
            zs_text = F.normalize(self.fixed_text_features(classnames), dim=-1)     # (C, E)
            zs_image = F.normalize(self.clip.encode_image(images), dim=-1)          # (B, E)
            zs_logits = scaled_dot(zs_image, zs_text, scale)                        # (B, C), fp32
        ce = F.cross_entropy(logits, labels)
        l1_text = self.text_weight * F.l1_loss(text, zs_text.to(text.dtype))
        l1_image = self.image_weight * F.l1_loss(image, zs_image.to(image.dtype))
        kl = F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zs_logits.float(), dim=1),
                      reduction="sum", log_target=True) / logits.numel()            # KL(zs ‖ prompted) / (B·C)
        return dict(loss=ce + l1_text + l1_image + kl, logits=logits, ce=ce, l1_text=l1_text,
                    l1_image=l1_image, kl=kl, image_features=image_features, text_features=text_features)


def gpa_weights(epochs: int, mean: float = 15.0, std: float = 1.0) -> list:
    """Gaussian prompt aggregation: weight of the end-of-epoch prompts of epochs 1..E (sum 1).

    Normalised in log space: a short run far from the mean (e.g. 1 epoch, mean 15, std 0.3) has
    pdf values that all underflow to 0, and a plain pdf / sum(pdf) would divide by zero."""
    if not std > 0:
        raise LearnerError(f"--gpa-std must be positive, got {std}")
    log_pdf = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(log_pdf)
    pdf = [math.exp(v - top) for v in log_pdf]
    return [w / sum(pdf) for w in pdf]


# ================================================================================================
# PromptKD — Li et al., "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models",
# CVPR 2024
# ================================================================================================

class PromptKD(nn.Module):
    """PromptKD: a prompted student image encoder distilled from a PromptSRC teacher, no labels.

    The student has no text branch: its images are projected (Linear-BN-ReLU-Linear) into the
    teacher's text space and classified against the teacher's text features of the classes.
    Trainable: `visual_prompt` (4, D_v), `visual_deep[i]` (4, D_v) for blocks 1..8 and `projector`
    (≈1.01M values for ViT-B/16 -> ViT-L/14). The teacher (a trained PromptSRC learner on its own
    CLIP) is frozen; its text prompts belong to the tuned prompt P of DPC (docs/differences.md #5).
    Loss: kd_weight · T² · KL(teacher ‖ student) / (B·C) over all classes.
    """
    DEFAULTS = dict(epochs=20, lr=0.005, batch_size=32,
                    source="PromptKD config vit_b16_c2_ep20_batch32_4+4ctx used by the DPC release")
    dpc_extra = ("teacher.ctx", "teacher.text_deep.")  # teacher text prompts: part of P for DPC

    image_side = ("visual_prompt", "visual_deep.", "projector.")  # what f(V) reads (image_side_tensors)

    def __init__(self, clip, teacher: PromptSRC, n_ctx_vision: int = 4, depth_vision: int = 9,
                 kd_weight: float = 1000.0, temperature: float = 1.0):
        super().__init__()
        self.clip = clip
        self.teacher = teacher.requires_grad_(False).eval()
        d_vision, d_embed = clip.visual.conv1.weight.shape[0], clip.text_projection.shape[1]
        d_teacher = teacher.clip.text_projection.shape[1]
        self.visual_prompt = nn.Parameter(torch.randn(n_ctx_vision, d_vision) * 0.02)
        self.visual_deep = deep_prompts(depth_vision - 1, n_ctx_vision, d_vision)
        self.projector = nn.Sequential(nn.Linear(d_embed, d_teacher), nn.BatchNorm1d(d_teacher),
                                       nn.ReLU(inplace=True), nn.Linear(d_teacher, d_teacher))
        self.kd_weight, self.temperature = kd_weight, temperature
        self.teacher_text_cache = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def encode_text(self, classnames):
        return self.teacher.encode_text(classnames)                      # (C, E_teacher)

    def encode_image(self, images):
        student = self.clip.encode_image(images, self.visual_prompt, list(self.visual_deep))   # (B, E)
        return self.projector(student.float())                          # (B, E_teacher)

    def forward(self, images, classnames):
        return cosine_logits(self.encode_image(images), self.encode_text(classnames), self.clip.logit_scale.exp())

    @torch.no_grad()
    def teacher_text_features(self, classnames):
        """Frozen teacher text features of all classes, computed once (the teacher never changes here)."""
        key = tuple(classnames)
        if key not in self.teacher_text_cache:
            self.teacher_text_cache[key] = F.normalize(self.teacher.encode_text(classnames).float(), dim=-1)
        return self.teacher_text_cache[key]

    def training_loss(self, images, labels, classnames):
        """Labels are ignored: PromptKD distils on unlabeled images of all classes."""
        text = self.teacher_text_features(classnames)                                  # (C, E_t)
        with torch.no_grad():
            teacher_image = F.normalize(self.teacher.encode_image(images).float(), dim=-1)
            teacher_logits = scaled_dot(teacher_image, text, self.teacher.clip.logit_scale.exp())   # (B, C), fp32
        logits = cosine_logits(self.encode_image(images), text, self.clip.logit_scale.exp())  # (B, C)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="sum", log_target=True) * t * t / logits.numel()
        return dict(loss=self.kd_weight * kl, logits=logits, kl=kl)


# PromptKD's KD weight per dataset (scripts/promptkd/base2new_train.sh): 200 for these three.
KD_WEIGHT_200 = ("fgvc_aircraft", "oxford_flowers", "dtd")


# ================================================================================================
# Zero-shot CLIP — the "CLIP" row of base-to-new tables (CoOp's trainers/zsclip.py)
# ================================================================================================

class ZeroShotCLIP(nn.Module):
    """Zero-shot CLIP as CoOp evaluates it: one hand-written template per dataset (CoOp's
    CUSTOM_TEMPLATES = data.DATASETS[name].template, e.g. EuroSAT "a centered satellite photo of {}."),
    "a photo of a {}." for other data. Nothing is trained: not a learner, no prompt tensors."""
    image_side = ()

    def __init__(self, clip, template: str = "a photo of a {}."):
        super().__init__()
        self.clip, self.template = clip, template

    def encode_text(self, classnames):
        texts = [self.template.format(name.replace("_", " ")) for name in classnames]
        return self.clip.encode_text(tokenize(texts).to(self.clip.positional_embedding.device))   # (C, E)

    def encode_image(self, images):
        return self.clip.encode_image(images)

    def forward(self, images, classnames):
        return cosine_logits(self.encode_image(images), self.encode_text(classnames), self.clip.logit_scale.exp())


# ================================================================================================
# DePT — Zhang et al., "DePT: Decoupled Prompt Tuning", CVPR 2024: the plug-and-play method that DPC's
# Fig. 5 compares with. It decouples at the feature level, beside a learner, in stage 1.
# ================================================================================================

class FiLM(nn.Module):
    """DePT's channel-wise transformation of a feature: y = γ ⊙ x + β, γ = 1 and β = 0 at the start (E,).
    γ and β stay fp32 and are cast to the feature's dtype (under autocast the feature may be 16-bit)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))    # γ
        self.bias = nn.Parameter(torch.zeros(width))    # β

    def forward(self, x):
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


class DePT(nn.Module):
    """A learner with DePT's Channel Adjusted Transfer (CAT) head: FiLM maps on its raw image and text
    features and a linear classifier over the classes it is trained on (the base classes).

    Training: (1-λ)·(the learner's loss) + λ·CE(head over 2B rows), the rows being FiLM_text(t_{y_i}) for
    each image's class, then FiLM_image(v_i), labels [y; y]. Nothing is detached: the head's loss trains
    the prompts too. For CoOp and MaPLe the learner's loss is its cross-entropy, as in DePT; PromptSRC's
    whole loss is our extension. Inference: classes the head knows get (1-λ)·s + λ·(W·FiLM_image(v) + b)
    (raw logits fused, not probabilities); any other class set gets the learner's s alone.
    Trainable: the learner's prompts, `film_image`, `film_text` (γ, β: E each) and `linear_head` (W: C×E, b: C).
    Original names: film_lp_img, film_lp_text, linear_probe_proj (Koorye/DePT trainers/elp_coop.py).
    """
    # DePT's recipe (configs/trainers/ExtrasLinearProbe*/ and train.py; docs/dept.md); CoOp's
    # 16 random context tokens and MaPLe's 2 from "a photo of a" are DePT's too. PromptSRC + DePT is our
    # extension and keeps PromptSRC's own defaults.
    RECIPE = {"coop": dict(epochs=10, lr=0.0035, batch_size=4, n_ctx=16, ctx_init=""),
              "maple": dict(epochs=10, lr=0.0035, batch_size=4, n_ctx=2, ctx_init="a photo of a"),
              "promptsrc": {}}
    WEIGHT = 0.7              # λ: loss weight and fusion weight (TRAINER.LINEAR_PROBE.WEIGHT)
    HEAD_LR_MULT = 6.5        # FiLM and head learn at 6.5x the prompt's lr, except in the warm-up epoch
    HEAD = ("film_image.", "film_text.", "linear_head.")   # the tensors of the head (lr group 1)

    def __init__(self, learner, classnames, weight: float = WEIGHT):
        super().__init__()
        if isinstance(learner, PromptKD):
            raise LearnerError("PromptKD + DePT is not defined: PromptKD distils on unlabeled images of all "
                               "classes, and DePT's head needs labelled base classes; use coop, maple or promptsrc")
        width = learner.clip.text_projection.shape[1]                   # E
        self.learner = learner
        self.film_image, self.film_text = FiLM(width), FiLM(width)
        self.linear_head = nn.Linear(width, len(classnames))            # W (C, E), b (C,)
        self.classnames, self.weight = list(classnames), weight
        self.image_side = tuple("learner." + p for p in learner.image_side)

    @property
    def clip(self):
        return self.learner.clip

    def encode_text(self, classnames):
        return self.learner.encode_text(classnames)

    def encode_image(self, images):
        return self.learner.encode_image(images)

    def head_rows(self, classnames):
        """The head's rows of `classnames`, or None when one of them is not a class it was trained on:
        base classes, and the ImageNet variants' classes (ImageNet-A/-R: 200 of its 1000 rows)."""
        row = {name: i for i, name in enumerate(self.classnames)}
        return [row[c] for c in classnames] if all(c in row for c in classnames) else None

    def logits(self, image_features, text_features, classnames):
        """Raw image (B, E) and text (C, E) features -> (B, C): CLIP's (ITM) logits s, fused with the head's
        on classes the head knows, and s alone on any others (new classes, other datasets)."""
        s = cosine_logits(image_features, text_features, self.learner.clip.logit_scale.exp())   # (B, C)
        rows = self.head_rows(classnames)
        if rows is None:
            return s
        with torch.autocast(image_features.device.type, enabled=False):   # fp32, as s (scaled_dot)
            head = F.linear(self.film_image(image_features.float()), self.linear_head.weight[rows].float(),
                            self.linear_head.bias[rows].float())                                # (B, C)
        return (1 - self.weight) * s + self.weight * head

    def forward(self, images, classnames):
        return self.logits(self.encode_image(images), self.encode_text(classnames), classnames)

    def training_loss(self, images, labels, classnames):
        if list(classnames) != self.classnames:
            raise LearnerError("DePT trains its head on the classes it was built with; got another class list")
        out = self.learner.training_loss(images, labels, classnames)
        v, t = out["image_features"], out["text_features"]                              # (B, E), (C, E)
        rows = torch.cat([self.film_text(t[labels]), self.film_image(v)])              # (2B, E): text rows first
        head = self.linear_head(rows)                                                  # (2B, C)
        cat = F.cross_entropy(head.float(), torch.cat([labels, labels]))
        loss = (1 - self.weight) * out["loss"] + self.weight * cat
        return dict(out, loss=loss, learner_loss=out["loss"], cat=cat)


# ================================================================================================
# The learners, their checkpoints and the tuned prompt P
# ================================================================================================

LEARNERS = {"coop": CoOp, "maple": MaPLe, "promptsrc": PromptSRC, "promptkd": PromptKD}
FROZEN = ("clip.", "teacher.", "learner.clip.", "learner.teacher.")  # never in a learner checkpoint (DePT: learner.*)


class LearnerError(ValueError):
    """Unknown learner, or a checkpoint that does not fit the learner (one-line message)."""


def build_learner(name: str, clip, teacher=None, n_ctx: int = None, ctx_init: str = None, kd_weight: float = None,
                  dept_classes: list = None, dept_weight: float = DePT.WEIGHT):
    """The learner `name` on `clip`; None keeps a learner's own default for an option. With `dept_classes`
    the learner gets DePT's head over those classes (train_backbone.py --dept)."""
    if dept_classes is not None:
        return DePT(build_learner(name, clip, teacher, n_ctx, ctx_init, kd_weight), dept_classes, dept_weight)
    if name not in LEARNERS:
        raise LearnerError(f"unknown learner '{name}': choose one of {', '.join(LEARNERS)}")
    options = {k: v for k, v in dict(n_ctx=n_ctx, ctx_init=ctx_init).items() if v is not None}
    if name == "promptsrc" and "n_ctx" in options:
        options["n_ctx_text"] = options.pop("n_ctx")
    if name == "promptkd":
        if teacher is None:
            raise LearnerError("PromptKD needs a teacher: pass --teacher RUN_DIR of a promptsrc run")
        return PromptKD(clip, teacher, **({} if kd_weight is None else dict(kd_weight=kd_weight)))
    return LEARNERS[name](clip, **options)


CONTEXT_LENGTH = 77  # CLIP's text context, SOT and EOT included


def check_classnames(learner, classnames, training: bool = False) -> None:
    """Before a run: every class prompt the learner tokenizes fits CLIP's 77 tokens (the tokenizer would
    stop the run at its first step), and no two classes give CLIP the same prompt once it has cleaned
    them (lower case, whitespace, "_" read as " "): such classes could never be told apart.
    `training` adds what only the training loss tokenizes (PromptSRC's 60 templates)."""
    learner = learner.learner if isinstance(learner, DePT) else learner       # DePT: the prompts of its learner
    source = learner.teacher if isinstance(learner, PromptKD) else learner   # PromptKD: the teacher's prompts
    templates = [source.template] if isinstance(source, ZeroShotCLIP) else [prompt_text(source.prefix, "{}")]
    if training and isinstance(learner, PromptSRC):
        templates += PROMPTSRC_TEMPLATES
    words = {t: len(tokenizer().encode(t.format(""))) for t in templates}   # tokens around the name
    seen = {}
    for name in classnames:
        ids = tuple(tokenizer().encode(name.replace("_", " ")))
        if ids in seen:
            raise LearnerError(f"classes {seen[ids]!r} and {name!r} give CLIP the same prompt (it lower-cases and "
                               f"cleans whitespace), so they can never be told apart: rename one of them")
        seen[ids] = name
        for template in templates:
            # template + name is within a token or two of the sum of their lengths (BPE works per word);
            # only prompts near the limit are tokenized whole, which is the exact count
            if words[template] + len(ids) + 2 < CONTEXT_LENGTH - 4:
                continue
            n = len(tokenizer().encode(template.format(name.replace("_", " ")))) + 2    # + SOT, EOT
            if n > CONTEXT_LENGTH:
                raise LearnerError(f"the prompt {template!r} of class {name[:40]!r}... has {n} tokens, more than "
                                   f"CLIP's {CONTEXT_LENGTH}: shorten that class name (classnames.txt, split file "
                                   f"or folder name)")


def image_side_tensors(learner) -> dict:
    """The learner's own tensors that f(V) reads (its class attribute `image_side`: name prefixes), as
    they are now (inside `substitute`, the substituted values): with the frozen CLIP, all that image
    features depend on. Empty for CLIP's plain image encoder (CoOp, zero-shot CLIP)."""
    prefixes = getattr(learner, "image_side", ())
    if not prefixes:
        return {}
    own = dict(learner.named_parameters())
    own.update(learner.named_buffers())
    return {n: t for n, t in own.items() if n.startswith(prefixes) and not n.startswith(FROZEN)}


def trainable_parameters(learner) -> dict:
    return {n: p for n, p in learner.named_parameters() if p.requires_grad}


def prompt_tensors(learner) -> dict:
    """The tuned prompt P of DPC (Eq. 5; docs/differences.md #5): every tensor the learner trains, plus the
    text-side tensors it uses at inference without training them (PromptKD's teacher prompts)."""
    extra = getattr(learner, "dpc_extra", ())
    return {n: p for n, p in learner.named_parameters() if p.requires_grad or (extra and n.startswith(extra))}


def learner_state(learner) -> dict:
    """Everything a learner owns (prompts, projector, BN statistics), never the frozen CLIP/teacher."""
    return {k: v.detach().clone() for k, v in learner.state_dict().items() if not k.startswith(FROZEN)}


def load_learner_state(learner, state: dict) -> None:
    """Strict load of a learner checkpoint: exactly the learner's own tensors, same shapes."""
    own = learner_state(learner)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise LearnerError(f"checkpoint does not fit this {type(learner).__name__} learner "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}): was it trained with another learner?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise LearnerError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, this learner expects "
                             f"{tuple(own[k].shape)}: was it trained with another CLIP or --n-ctx?")
    learner.load_state_dict(state, strict=False)


@contextmanager
def substitute(learner, values: dict):
    """Run `learner` with `values` in place of the prompt tensors of the same names.

    The values may be any tensors (e.g. DPC's trainable P', which gradients then reach); the
    learner's own parameters are put back on exit. This is torch.func.functional_call's mechanism,
    kept as a context so that encode_text and encode_image can both be called inside it.
    """
    saved = {}
    try:
        for name, value in values.items():
            module_name, _, leaf = name.rpartition(".")
            module = learner.get_submodule(module_name)
            saved[name] = (module, leaf, module._parameters[leaf])
            module._parameters[leaf] = value
        yield learner
    finally:
        for module, leaf, original in saved.values():
            module._parameters[leaf] = original
