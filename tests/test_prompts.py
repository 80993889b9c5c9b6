"""Tests for the four prompt learners in prompts.py (CoOp, MaPLe, PromptSRC, PromptKD).

Shape, gradient flow, checkpoint round trips, the prompt-embedding path against CLIP's token path,
where the deep prompts enter the towers, the ViT-B/16 parameter counts, PromptSRC's and PromptKD's
losses against hand computations, and `substitute` (the hook DPC uses). CPU only, on a tiny random
CLIP (clip_model.random_clip); nothing here reads files outside the repository.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import clip_model
import prompts
from clip_model import random_clip, tokenize

CLASSES = ["red stripes", "golden_retriever", "cat", "blue stripes", "sea lion"]   # C = 5
B = 4
NAMES = ["coop", "maple", "promptsrc", "promptkd"]
EXPECTED_TRAINABLE = {  # tensor names each learner trains (depth 9: deep prompts for blocks 1..8)
    "coop": {"ctx"},
    "maple": {"ctx", "proj.weight", "proj.bias"}
             | {f"compound_prompts_text.{i}" for i in range(8)}
             | {f"compound_prompt_projections.{i}.{w}" for i in range(8) for w in ("weight", "bias")},
    "promptsrc": {"ctx", "visual_prompt"} | {f"text_deep.{i}" for i in range(8)}
                 | {f"visual_deep.{i}" for i in range(8)},
    "promptkd": {"visual_prompt"} | {f"visual_deep.{i}" for i in range(8)}
                | {f"projector.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")},
}


@pytest.fixture(scope="module")
def clip():
    return random_clip("tiny", seed=0)


@pytest.fixture(scope="module")
def teacher():
    return prompts.PromptSRC(random_clip("tiny", seed=1))


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def labels():
    return torch.tensor([0, 3, 1, 4])


def build(name, clip, teacher, seed=0, **kwargs):
    """A fresh learner (its own random prompts from `seed`); the frozen CLIP is shared."""
    torch.manual_seed(seed)
    if name == "promptkd":
        return prompts.PromptKD(clip, teacher, **kwargs)
    return prompts.LEARNERS[name](clip, **kwargs)


def grads_of(learner):
    return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# Interface: shapes, loss, gradients, checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_logits_shape_and_finite_loss(name, clip, teacher, images, labels):
    learner = build(name, clip, teacher)
    learner.eval()
    with torch.no_grad():
        logits = learner(images, CLASSES)
    assert logits.shape == (B, len(CLASSES))
    assert torch.isfinite(logits).all()
    learner.train()
    out = learner.training_loss(images, labels, CLASSES)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["logits"].shape == (B, len(CLASSES))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_one_backward_reaches_exactly_the_trainable_tensors(name, clip, teacher, images, labels):
    learner = build(name, clip, teacher).train()
    trainable = prompts.trainable_parameters(learner)
    assert set(trainable) == EXPECTED_TRAINABLE[name]
    learner.training_loss(images, labels, CLASSES)["loss"].backward()
    grads = grads_of(learner)
    assert set(grads) == set(trainable)
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{n} got a zero/non-finite gradient"
    frozen = [n for n, p in learner.named_parameters() if n.startswith(("clip.", "teacher."))]
    assert frozen and not any(n in trainable for n in frozen)
    assert not any(p.requires_grad or p.grad is not None for p in learner.clip.parameters())
    if name == "promptkd":
        assert not any(p.requires_grad or p.grad is not None for p in learner.teacher.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_learner_state_round_trips_through_torch_save(name, clip, teacher, images, labels, tmp_path):
    learner = build(name, clip, teacher, seed=0).train()
    with torch.no_grad():  # "trained" prompts; a train-mode pass moves PromptKD's BN statistics
        for p in prompts.trainable_parameters(learner).values():
            p.add_(0.05 * torch.randn_like(p))
        learner.training_loss(images, labels, CLASSES)
    state = prompts.learner_state(learner)
    assert state and not any(k.startswith(("clip.", "teacher.")) for k in state)
    torch.save(state, tmp_path / "state.pt")
    fresh = build(name, clip, teacher, seed=1).eval()
    learner.eval()
    with torch.no_grad():
        want = learner(images, CLASSES)
        assert not torch.equal(fresh(images, CLASSES), want)  # the round trip has something to do
        prompts.load_learner_state(fresh, torch.load(tmp_path / "state.pt", weights_only=True))
        assert torch.equal(fresh(images, CLASSES), want)
    if name == "promptkd":
        assert torch.equal(fresh.projector[1].running_mean, learner.projector[1].running_mean)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_loading_another_learners_state_fails(name, clip, teacher):
    learner = build(name, clip, teacher)
    for other in NAMES:
        if other != name:
            with pytest.raises(prompts.LearnerError, match="another learner"):
                prompts.load_learner_state(learner, prompts.learner_state(build(other, clip, teacher)))


@pytest.mark.parametrize("name", NAMES)
def test_state_from_a_clip_of_another_width_fails_naming_the_shape(name, clip, teacher):
    narrow = clip_model.CLIP(**dict(clip_model.ARCHS["tiny"], transformer_width=64, vision_width=64)).requires_grad_(False)
    small_teacher = prompts.PromptSRC(narrow)
    state = prompts.learner_state(build(name, narrow, small_teacher))
    learner = build(name, clip, teacher)
    with pytest.raises(prompts.LearnerError, match=r"shape \(\d+, 64\).*expects \(\d+, 128\)"):
        prompts.load_learner_state(learner, state)


def test_build_learner_names_the_choices_and_needs_a_teacher_for_promptkd(clip):
    with pytest.raises(prompts.LearnerError, match="coop, maple, promptsrc, promptkd"):
        prompts.build_learner("cocoop", clip)
    with pytest.raises(prompts.LearnerError, match="teacher"):
        prompts.build_learner("promptkd", clip)
    assert isinstance(prompts.build_learner("maple", clip, n_ctx=2), prompts.MaPLe)
    kd = prompts.build_learner("promptkd", clip, prompts.PromptSRC(clip), kd_weight=200.0)
    assert isinstance(kd, prompts.PromptKD) and kd.kd_weight == 200.0
    assert prompts.build_learner("promptkd", clip, prompts.PromptSRC(clip)).kd_weight == 1000.0
    assert prompts.build_learner("promptsrc", clip, n_ctx=2).ctx.shape == (2, 128)


# ------------------------------------------------------------------------------------------------
# Text side: the prompt-embedding path against CLIP's own token path
# ------------------------------------------------------------------------------------------------

def zero_shot_text(clip, template="a photo of a {}."):
    return clip.encode_text(tokenize([template.format(c.replace("_", " ")) for c in CLASSES]))


def test_coop_from_a_photo_of_a_is_zero_shot_clip(clip):
    coop = prompts.CoOp(clip, ctx_init="a photo of a")
    assert coop.ctx.shape == (4, 128)
    with torch.no_grad():
        assert torch.allclose(coop.encode_text(CLASSES), zero_shot_text(clip), atol=1e-5)


def test_coop_random_init_uses_n_ctx_and_is_not_zero_shot(clip):
    torch.manual_seed(0)
    coop = prompts.CoOp(clip, n_ctx=16, ctx_init="")
    assert coop.ctx.shape == (16, 128) and 0.015 < coop.ctx.std().item() < 0.025
    with torch.no_grad():
        assert not torch.allclose(coop.encode_text(CLASSES), zero_shot_text(clip), atol=1e-3)


def test_maple_context_is_a_photo_and_of_a_stay_frozen_words(clip):
    maple = prompts.MaPLe(clip)
    ids = tokenize("a photo of a")[0]
    assert maple.ctx.shape == (2, 128)
    assert torch.equal(maple.ctx.data, clip.token_embedding.weight[ids[1:3].long()])    # "a", "photo"
    tokens, _, _ = prompts.class_prompts(clip, CLASSES, maple.prefix, maple.cache)
    assert torch.equal(tokens, tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]))
    with torch.no_grad():  # with the deep prompts left out, the text side is zero-shot CLIP
        shallow = prompts.encode_prompted_text(clip, maple.ctx, CLASSES, maple.prefix, {})
        assert torch.allclose(shallow, zero_shot_text(clip), atol=1e-5)


def test_maple_longer_context_is_random_as_in_maple(clip):
    """MaPLe initialises from the phrase only when n_ctx <= 4; longer contexts are N(0, 0.02²)."""
    torch.manual_seed(0)
    maple = prompts.build_learner("maple", clip, n_ctx=6)
    assert maple.ctx.shape == (6, 128) and maple.prefix == "X X X X X X"
    assert 0.015 < maple.ctx.std().item() < 0.025
    assert prompts.MaPLe(clip, n_ctx=3).prefix == "a photo of a"   # "a" stays a frozen word


def test_promptsrc_context_replaces_all_four_words(clip):
    src = prompts.PromptSRC(clip)
    ids = tokenize("a photo of a")[0]
    assert torch.equal(src.ctx.data, clip.token_embedding.weight[ids[1:5].long()])
    with torch.no_grad():
        shallow = prompts.encode_prompted_text(clip, src.ctx, CLASSES, src.prefix, {})
        assert torch.allclose(shallow, zero_shot_text(clip), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Depth: which block sees which prompt
# ------------------------------------------------------------------------------------------------

def block_inputs(transformer, run):
    """Inputs (B, T, D) of every block of `transformer` during `run()`."""
    seen, handles = {}, []
    for i, block in enumerate(transformer.resblocks):
        handles.append(block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_injected(seen, deep, slot, n_blocks):
    """Blocks 1..len(deep) get deep[i-1] at `slot`; block 0 and blocks after them do not."""
    for i in range(n_blocks):
        got = seen[i][:, slot]                                                   # (B, M, D)
        if 1 <= i <= len(deep):
            assert torch.equal(got, deep[i - 1].detach().expand_as(got)), f"block {i}"
        else:
            assert not any(torch.allclose(got, p.detach().expand_as(got), atol=1e-4) for p in deep), f"block {i}"


@pytest.mark.parametrize("depth", [9, 3])
def test_maple_deep_prompts_enter_blocks_1_to_depth_minus_1(clip, images, depth):
    maple = build("maple", clip, None, depth=depth)
    assert len(maple.compound_prompts_text) == len(maple.compound_prompt_projections) == depth - 1
    assert sum(p.numel() for p in prompts.trainable_parameters(maple).values()) == \
        2 * 128 + (128 * 128 + 128) + (depth - 1) * (2 * 128 + 128 * 128 + 128)
    text = block_inputs(clip.transformer, lambda: maple.encode_text(CLASSES))
    assert_injected(text, list(maple.compound_prompts_text), slice(1, 3), clip.transformer.layers)
    vision = block_inputs(clip.visual.transformer, lambda: maple.encode_image(images))
    with torch.no_grad():
        coupled = [f(p) for f, p in zip(maple.compound_prompt_projections, maple.compound_prompts_text)]
    assert_injected(vision, coupled, slice(-2, None), clip.visual.transformer.layers)
    with torch.no_grad():  # block 0 sees ctx (+ positions) in text and ln_pre(proj(ctx)) in vision
        assert torch.allclose(text[0][:, 1:3], (maple.ctx + clip.positional_embedding[1:3]).expand(len(CLASSES), -1, -1))
        assert vision[0].shape[1] == 16 + 1 + 2                                 # CLS + 4x4 patches + 2 prompts
        assert torch.allclose(vision[0][:, -2:], clip.visual.ln_pre(maple.proj(maple.ctx)).expand(B, -1, -1), atol=1e-5)


@pytest.mark.parametrize("depth", [9, 3])
def test_promptsrc_deep_prompts_enter_blocks_1_to_depth_minus_1(clip, images, depth):
    src = build("promptsrc", clip, None, depth_text=depth, depth_vision=depth)
    assert len(src.text_deep) == len(src.visual_deep) == depth - 1
    assert sum(p.numel() for p in prompts.trainable_parameters(src).values()) == 2 * depth * 4 * 128
    text = block_inputs(clip.transformer, lambda: src.encode_text(CLASSES))
    assert_injected(text, list(src.text_deep), slice(1, 5), clip.transformer.layers)
    vision = block_inputs(clip.visual.transformer, lambda: src.encode_image(images))
    assert vision[0].shape[1] == 16 + 1 + 4                                     # appended after the patches
    assert_injected(vision, list(src.visual_deep), slice(-4, None), clip.visual.transformer.layers)
    with torch.no_grad():  # block 0: ctx + positions in text; ln_pre(visual_prompt), no positions, in vision
        assert torch.allclose(text[0][:, 1:5], (src.ctx + clip.positional_embedding[1:5]).expand(len(CLASSES), -1, -1))
        assert torch.allclose(vision[0][:, -4:], clip.visual.ln_pre(src.visual_prompt).expand(B, -1, -1), atol=1e-5)


def noise_like(p, seed=12345):
    """A random shift. Not a constant: adding c to every entry of a token is invisible behind
    CLIP's LayerNorms (ln_pre, ln_1 of each block), so `p + 1` would change nothing."""
    return 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))


def perturbed(learner, tensor, run):
    """run() with `tensor` (a parameter of learner) randomly shifted, restored afterwards."""
    saved = tensor.detach().clone()  # restore by copy: (p + s) - s is not always p in floating point
    with torch.no_grad():
        tensor.add_(noise_like(tensor))
        try:
            return run()
        finally:
            tensor.copy_(saved)


@pytest.mark.slow
@pytest.mark.parametrize("name,deep_lists", [("maple", ("compound_prompts_text",)),
                                             ("promptsrc", ("text_deep", "visual_deep"))])
def test_every_deep_prompt_changes_the_output(name, deep_lists, clip, images):
    learner = build(name, clip, None)
    with torch.no_grad():
        text, image = learner.encode_text(CLASSES), learner.encode_image(images)
    for attr in deep_lists:
        deep = getattr(learner, attr)
        assert len(deep) == 8
        for i, p in enumerate(deep):
            if attr != "visual_deep":
                new_text = perturbed(learner, p, lambda: learner.encode_text(CLASSES))
                assert not torch.allclose(new_text, text, atol=1e-5), f"{attr}[{i}] does not reach the text"
            if attr != "text_deep":
                new_image = perturbed(learner, p, lambda: learner.encode_image(images))
                assert not torch.allclose(new_image, image, atol=1e-5), f"{attr}[{i}] does not reach the image"
    if name == "promptsrc":  # independent towers: text prompts never touch the image side
        assert torch.equal(perturbed(learner, learner.ctx, lambda: learner.encode_image(images)), image)
        assert torch.equal(perturbed(learner, learner.text_deep[0], lambda: learner.encode_image(images)), image)
        assert torch.equal(perturbed(learner, learner.visual_prompt, lambda: learner.encode_text(CLASSES)), text)


def test_maple_visual_prompts_follow_the_text_prompts(clip, images):
    maple = build("maple", clip, None)
    with torch.no_grad():
        image = maple.encode_image(images)
    assert not torch.allclose(perturbed(maple, maple.ctx, lambda: maple.encode_image(images)), image, atol=1e-5)
    for k, p in enumerate(maple.compound_prompts_text):
        assert not torch.allclose(perturbed(maple, p, lambda: maple.encode_image(images)), image, atol=1e-5), k
    # ... and the image loss trains the text prompts through the coupling functions
    maple.encode_image(images).square().sum().backward()
    for n, p in prompts.trainable_parameters(maple).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    first = maple.compound_prompt_projections[0]
    for layer in maple.compound_prompt_projections:
        assert torch.equal(layer.weight, first.weight) and torch.equal(layer.bias, first.bias)
    assert len({id(layer.weight) for layer in maple.compound_prompt_projections}) == 8   # copies, not shared
    assert not torch.equal(maple.proj.weight, first.weight)


# ------------------------------------------------------------------------------------------------
# Parameter counts of the original configurations (ViT-B/16; PromptKD's teacher on ViT-L/14)
# ------------------------------------------------------------------------------------------------

def test_trainable_counts_on_vit_b16():
    with torch.device("meta"):
        clip = clip_model.CLIP(**clip_model.ARCHS["ViT-B/16"]).requires_grad_(False)
        large = clip_model.CLIP(**clip_model.ARCHS["ViT-L/14"]).requires_grad_(False)
        learners = {name: prompts.build_learner(name, clip) for name in ("coop", "maple", "promptsrc")}
        learners["promptkd"] = prompts.build_learner("promptkd", clip, prompts.PromptSRC(large))
    counts = {name: sum(p.numel() for p in prompts.trainable_parameters(l).values()) for name, l in learners.items()}
    assert counts == dict(coop=2_048, maple=3_555_072, promptsrc=46_080, promptkd=1_013_760)
    kd = learners["promptkd"]
    assert kd.projector[0].in_features == 512 and kd.projector[-1].out_features == 768
    # DPC's tuned prompt P of PromptKD adds the teacher's text prompts: ctx + 8 deep, 4 x 768 each
    assert sum(p.numel() for p in prompts.prompt_tensors(kd).values()) == 1_013_760 + 9 * 4 * 768


# ------------------------------------------------------------------------------------------------
# PromptSRC: the losses by hand, the templates, Gaussian prompt aggregation
# ------------------------------------------------------------------------------------------------

def test_promptsrc_templates():
    t = prompts.PROMPTSRC_TEMPLATES
    assert len(t) == 60 == len(set(t))
    assert t[0] == "a photo of a {}." and t[-1] == "itap of the {}." and t.count("a photo of a {}.") == 1
    assert all(s.count("{}") == 1 for s in t)


@pytest.mark.slow
def test_promptsrc_loss_terms_by_hand(clip, images, labels):
    src = build("promptsrc", clip, None).train()
    out = src.training_loss(images, labels, CLASSES)
    with torch.no_grad():
        scale = clip.logit_scale.exp()
        txt = src.encode_text(CLASSES)
        txt = txt / txt.norm(dim=-1, keepdim=True)                                     # (C, E)
        img = src.encode_image(images)
        img = img / img.norm(dim=-1, keepdim=True)                                     # (B, E)
        logits = scale * img @ txt.t()
        ce = (torch.logsumexp(logits, dim=1) - logits[torch.arange(B), labels]).mean()
        per_template = torch.stack([zero_shot_text(clip, t) for t in prompts.PROMPTSRC_TEMPLATES])  # (60, C, E)
        zs_txt = per_template.mean(0)
        zs_txt = zs_txt / zs_txt.norm(dim=-1, keepdim=True)
        zs_img = clip.encode_image(images)
        zs_img = zs_img / zs_img.norm(dim=-1, keepdim=True)
        l1_text = 25 * (txt - zs_txt).abs().sum() / txt.numel()
        l1_image = 10 * (img - zs_img).abs().sum() / img.numel()
        p_zs = torch.softmax(scale * zs_img @ zs_txt.t(), dim=1)
        p = torch.softmax(logits, dim=1)
        kl = (p_zs * (p_zs.log() - p.log())).sum() / (B * len(CLASSES))
        # the text target averages UNNORMALISED features: not the mean of unit vectors
        unit_mean = F.normalize(F.normalize(per_template, dim=-1).mean(0), dim=-1)
        assert not torch.allclose(unit_mean, zs_txt, atol=1e-6)
    for key, want in dict(ce=ce, l1_text=l1_text, l1_image=l1_image, kl=kl).items():
        assert torch.allclose(out[key], want, rtol=1e-4, atol=1e-6), (key, out[key].item(), want.item())
    assert kl > 0 and l1_text > 0 and l1_image > 0
    assert torch.allclose(out["loss"], ce + l1_text + l1_image + kl, rtol=1e-5)
    assert torch.allclose(out["logits"], logits, atol=1e-5)


def test_gpa_weights():
    w = prompts.gpa_weights(20, 15, 1)
    assert len(w) == 20 and math.isclose(sum(w), 1.0, rel_tol=1e-12)
    assert max(range(20), key=w.__getitem__) == 14            # epoch 15
    assert w[14] == pytest.approx(0.3989, abs=1e-4)
    assert w[13] == pytest.approx(0.2420, abs=1e-4) and w[15] == pytest.approx(0.2420, abs=1e-4)
    assert w[12] == pytest.approx(0.0540, abs=1e-4) and w[0] < 1e-20
    assert math.isclose(sum(prompts.gpa_weights(2, 15, 1)), 1.0)  # still a distribution far from the mean
    assert prompts.gpa_weights(1, 15, 0.3) == [1.0]                # every pdf value underflows here
    far = prompts.gpa_weights(3, 50, 0.5)
    assert math.isclose(sum(far), 1.0) and far[2] == pytest.approx(1.0)
    with pytest.raises(prompts.LearnerError, match="gpa-std"):
        prompts.gpa_weights(20, 15, 0)


@pytest.mark.slow
def test_promptsrc_text_target_stays_fp32_under_autocast(clip):
    """The cached target is built once; under bf16 autocast it must still be frozen CLIP's fp32 one."""
    want = prompts.PromptSRC(clip).fixed_text_features(CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prompts.PromptSRC(clip).fixed_text_features(CLASSES)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_training_loss_under_bf16_autocast(name, clip, teacher, images, labels):
    """The GPU path (precision.autocast) on CPU: finite fp32 loss, fp32 gradients on fp32 prompts."""
    learner = build(name, clip, teacher).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = learner.training_loss(images, labels, CLASSES)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for n, p in prompts.trainable_parameters(learner).items():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


# ------------------------------------------------------------------------------------------------
# PromptKD: projector width, label-free loss by hand, frozen teacher
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_teacher():
    """A teacher whose joint embedding width (48) differs from the student's (64)."""
    torch.manual_seed(2)
    clip = clip_model.CLIP(**dict(clip_model.ARCHS["tiny"], embed_dim=48)).requires_grad_(False).eval()
    return prompts.PromptSRC(clip)


@pytest.mark.slow
def test_promptkd_projects_into_the_teachers_width(clip, wide_teacher, images):
    kd = build("promptkd", clip, wide_teacher).eval()
    assert kd.projector[0].in_features == 64 and kd.projector[-1].out_features == 48
    with torch.no_grad():
        assert kd.encode_image(images).shape == (B, 48)
        assert kd.encode_text(CLASSES).shape == (len(CLASSES), 48)
        assert kd(images, CLASSES).shape == (B, len(CLASSES))


def test_promptkd_loss_ignores_labels_and_equals_kl_by_hand(clip, wide_teacher, images):
    kd = build("promptkd", clip, wide_teacher, kd_weight=1000.0).train()
    with torch.no_grad():
        a = kd.training_loss(images, torch.tensor([0, 1, 2, 3]), CLASSES)
        b = kd.training_loss(images, torch.tensor([4, 4, 0, 0]), CLASSES)
        assert torch.equal(a["loss"], b["loss"])
        t = wide_teacher
        txt = F.normalize(t.encode_text(CLASSES), dim=-1)                               # (C, 48)
        p_t = torch.softmax(t.clip.logit_scale.exp() * F.normalize(t.encode_image(images), dim=-1) @ txt.t(), dim=1)
        student = F.normalize(kd.encode_image(images), dim=-1)                          # (B, 48), BN batch stats
        q_s = torch.softmax(clip.logit_scale.exp() * student @ txt.t(), dim=1)
        kl = (p_t * (p_t.log() - q_s.log())).sum() / (B * len(CLASSES))
    assert kl > 0
    assert torch.allclose(a["loss"], 1000.0 * kl, rtol=1e-4), (a["loss"].item(), 1000.0 * kl.item())


def test_promptkd_teacher_stays_in_eval_mode(clip, teacher):
    kd = build("promptkd", clip, teacher)
    kd.train()
    assert kd.training and kd.projector.training
    assert not kd.teacher.training and not any(m.training for m in kd.teacher.modules())
    kd.eval()
    assert not kd.projector.training and not kd.teacher.training


def test_promptkd_dpc_prompt_includes_the_teachers_text_prompts(clip, teacher):
    kd = build("promptkd", clip, teacher)
    names = set(prompts.prompt_tensors(kd))
    assert names == EXPECTED_TRAINABLE["promptkd"] | {"teacher.ctx"} | {f"teacher.text_deep.{i}" for i in range(8)}
    assert not any(n.startswith("teacher.visual") or n.startswith("teacher.clip.") for n in names)


# ------------------------------------------------------------------------------------------------
# substitute(): DPC's way of running a learner with other prompt values
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_substitute_uses_the_values_passes_gradients_and_restores(name, clip, teacher, images, labels):
    learner = build(name, clip, teacher).eval()
    params = prompts.prompt_tensors(learner)
    originals = {n: p for n, p in params.items()}
    with torch.no_grad():
        before = learner(images, CLASSES)
        with prompts.substitute(learner, {n: p.detach().clone() for n, p in params.items()}):
            assert torch.equal(learner(images, CLASSES), before)
        key = "visual_prompt" if name == "promptkd" else "ctx"
        with prompts.substitute(learner, {key: params[key] + noise_like(params[key])}):
            assert not torch.allclose(learner(images, CLASSES), before, atol=1e-4)
        if name == "promptkd":  # the teacher's text prompts are part of P: substituting them acts
            with prompts.substitute(learner, {"teacher.ctx": params["teacher.ctx"] + noise_like(params["teacher.ctx"])}):
                assert not torch.allclose(learner(images, CLASSES), before, atol=1e-4)

    values = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    with prompts.substitute(learner, values):
        logits = learner(images, CLASSES)
        F.cross_entropy(logits, labels).backward()
    for n, v in values.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, n
    assert not grads_of(learner)  # the learner's own parameters were not used

    for n, p in prompts.prompt_tensors(learner).items():
        assert p is originals[n] and isinstance(p, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(learner(images, CLASSES), before)


def test_substitute_restores_after_an_exception(clip, teacher, images):
    learner = build("maple", clip, teacher).eval()
    originals = dict(prompts.prompt_tensors(learner))
    with pytest.raises(RuntimeError, match="boom"):
        with prompts.substitute(learner, {n: torch.zeros_like(p) for n, p in originals.items()}):
            assert torch.equal(learner.compound_prompt_projections[3].weight, torch.zeros(128, 128))
            raise RuntimeError("boom")
    assert all(p is originals[n] for n, p in prompts.prompt_tensors(learner).items())
    assert set(prompts.prompt_tensors(learner)) == set(originals)
    # a bad name fails inside the block's set-up and still restores what it had replaced
    with pytest.raises((AttributeError, KeyError)):
        with prompts.substitute(learner, {"ctx": originals["ctx"] * 0, "no_such.tensor": originals["ctx"]}):
            pass
    assert learner.ctx is originals["ctx"]


def test_substitute_works_under_a_state_round_trip(clip, teacher, images):
    """Values taken from a checkpoint give the checkpointed learner's logits."""
    source = build("promptsrc", clip, teacher, seed=3).eval()
    target = build("promptsrc", clip, teacher, seed=4).eval()
    state = prompts.learner_state(source)
    with torch.no_grad(), prompts.substitute(target, state):
        assert torch.equal(target(images, CLASSES), source(images, CLASSES))
