"""Tests for the pure DPC building blocks in train_dpc.py: feature filtering (Eq. 6-8), the
hard-negative InfoNCE (Eq. 9-11), Weighting-Decoupling (Eq. 12-13), flag checks and the negative
sampler (seeded property test). CPU only, no CLIP weights."""

import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import data
import toy_world
from train_dpc import (DPCError, NegativeSampler, base_class_prompt, check_omegas, check_topk, filter_features,
                       hard_negative_loss, initial_parallel_prompt, new_class_prompt, released_step_tensors,
                       scale_released_gradients, selection_matrix, weighting)


def prompts(seed: int, scale: float = 0.02) -> dict:
    """A prompt dict shaped like a learner's trainable tensors (CLIP token embeddings have std ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    return {"ctx": scale * torch.randn(4, 512, generator=g),
            "deep.1": scale * torch.randn(4, 768, generator=g),
            "proj.weight": scale * torch.randn(16, 8, generator=g)}


# ---------------------------------------------------------------------------------------------
# Feature filtering (Eq. 6-8)

def test_selection_matrix_is_one_hot_at_the_label():
    labels = torch.tensor([3, 0, 4, 1])
    q = selection_matrix(labels, 6)
    assert q.shape == (4, 6) and q.dtype == torch.float32
    assert torch.equal(q.sum(1), torch.ones(4))
    assert torch.equal(q.argmax(1), labels)
    assert set(q.unique().tolist()) == {0.0, 1.0}


def test_filter_features_equals_row_indexing_of_unit_rows():
    text = torch.randn(7, 32) * 5
    labels = torch.tensor([6, 2, 0, 5])
    out = filter_features(text, labels)
    normalised = text / text.norm(dim=-1, keepdim=True)
    assert out.shape == (4, 32)
    assert torch.allclose(out, normalised[labels], atol=0, rtol=0)  # one-hot product is exact
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-6)


def test_filter_features_passes_gradient_to_selected_rows_only():
    text = torch.randn(5, 8, requires_grad=True)
    filter_features(text, torch.tensor([1, 3])).sum().backward()
    assert text.grad[[0, 2, 4]].abs().sum() == 0 and text.grad[[1, 3]].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Hard-negative loss (Eq. 9-11)

def test_hard_negative_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]) * 3.0  # normalised inside
    txt = torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # unit rows
    s = 10.0
    img_n = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in img.tolist()]
    t = txt.tolist()
    sim = [[s * sum(a * b for a, b in zip(img_n[i], t[j])) for j in range(3)] for i in range(3)]
    # Eq. (10): image i against all texts; Eq. (11): text i against all images
    log_p_img = [sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(3))) for i in range(3)]
    log_p_txt = [sim[i][i] - math.log(sum(math.exp(sim[j][i]) for j in range(3))) for i in range(3)]
    eq9 = -sum(a + b for a, b in zip(log_p_img, log_p_txt)) / 3
    loss = hard_negative_loss(img, txt, s)
    assert loss.item() == pytest.approx(eq9 / 2, rel=1e-6)  # ½ · Eq. (9), the released code's scale


def test_hard_negative_loss_is_symmetric():
    img = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert hard_negative_loss(img, txt, 100.0).item() == pytest.approx(
        hard_negative_loss(txt, img, 100.0).item(), rel=1e-6)


def test_hard_negative_loss_limits():
    separated = torch.eye(5, 8)
    assert hard_negative_loss(separated * 2, separated, 100.0).item() < 1e-6
    same = torch.nn.functional.normalize(torch.ones(5, 8), dim=-1)
    assert hard_negative_loss(same, same, 100.0).item() == pytest.approx(math.log(5), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Weighting-Decoupling (Eq. 12-13)

def test_weighting_is_eq_12_and_exact_at_the_ends():
    tuned, parallel = prompts(0, scale=1.0), prompts(1, scale=1.0)
    for omega_b in (0.1, 0.2, 0.5, 0.03):
        mixed = weighting(parallel, tuned, omega_b)
        for k in tuned:
            torch.testing.assert_close(mixed[k], omega_b * parallel[k] + (1 - omega_b) * tuned[k], rtol=0, atol=1e-6)
    assert all(torch.equal(weighting(parallel, tuned, 1.0)[k], parallel[k]) for k in tuned)
    assert all(torch.equal(weighting(tuned, tuned, w)[k], tuned[k]) for w in (0.2, 0.37, 0.9) for k in tuned)


def test_new_class_prompt_with_omega_n_zero_is_tuned_exactly():
    tuned, parallel = prompts(0, scale=1.0), prompts(1, scale=3.0)
    p_n = new_class_prompt(parallel, tuned, 0.0)
    assert all(torch.equal(p_n[k], tuned[k]) for k in tuned)
    p_n = new_class_prompt(parallel, tuned, 1.0)
    assert all(torch.equal(p_n[k], parallel[k]) for k in tuned)
    p_n = new_class_prompt(parallel, tuned, 1e-6)
    assert all(torch.allclose(p_n[k], tuned[k], atol=1e-4, rtol=0) for k in tuned)
    assert not all(torch.equal(p_n[k], tuned[k]) for k in tuned)


def test_initial_parallel_prompt_is_tuned_exactly_and_trainable():
    tuned = prompts(0, scale=1.0)
    parallel = initial_parallel_prompt(tuned)
    assert all(torch.equal(parallel[k], tuned[k]) and parallel[k].requires_grad for k in tuned)
    assert all(parallel[k].data_ptr() != tuned[k].data_ptr() for k in tuned)  # a copy: P never moves with P'


def test_released_step_tensors_per_learner():
    """sple_coop.py decouples its one prompt; sple_promptkd.py only the teacher's text context."""
    names = ["ctx", "text_deep.0", "visual_prompt", "proj.weight"]
    for learner in ("coop", "maple", "promptsrc"):
        assert released_step_tensors(learner, names) == names
    kd = ["visual_prompt", "visual_deep.0", "projector.0.weight", "teacher.ctx", "teacher.text_deep.0"]
    assert released_step_tensors("promptkd", kd) == ["teacher.ctx"]


def test_scaled_gradient_is_the_released_gradient_through_its_shared_storage():
    """The release's forward (P̃_b - (1-ω_b) P)/ω_b with P sharing P̃_b's storage: its value is the parameter
    itself and its gradient (1/ω_b)·∂L/∂P' -- what scale_released_gradients applies to ∂L/∂P'."""
    w = prompts(5, scale=1.0)  # a fixed linear "loss"
    for omega_b in (0.1, 0.2, 0.5, 1.0):
        tuned = prompts(0)
        released = {k: torch.nn.Parameter(v) for k, v in tuned.items()}   # shares storage with tuned, as the release
        decoupled = {k: (released[k] - (1 - omega_b) * tuned[k]) * (1 / omega_b) for k in tuned}
        sum((decoupled[k] * w[k]).sum() for k in tuned).backward()
        parallel = initial_parallel_prompt(prompts(0))
        sum((parallel[k] * w[k]).sum() for k in tuned).backward()
        scale_released_gradients(parallel, list(tuned), omega_b)
        for k in tuned:
            torch.testing.assert_close(decoupled[k], released[k], rtol=0, atol=1e-6)   # the value: P' itself
            torch.testing.assert_close(parallel[k].grad, released[k].grad, rtol=1e-6, atol=0)


def test_base_class_prompt_modes():
    tuned, parallel = prompts(0), prompts(1)
    par = base_class_prompt(parallel, tuned, 0.2, "parallel")
    assert all(par[k] is parallel[k] for k in tuned)
    mix = base_class_prompt(parallel, tuned, 0.2, "mixed")
    ref = weighting(parallel, tuned, 0.2)
    assert all(torch.equal(mix[k], ref[k]) for k in tuned)
    with pytest.raises(DPCError, match="--base-inference"):
        base_class_prompt(parallel, tuned, 0.2, "converse")


def test_mismatched_prompt_dicts_are_refused():
    tuned = prompts(0)
    with pytest.raises(DPCError, match="missing"):
        weighting({k: v for k, v in tuned.items() if k != "ctx"}, tuned, 0.2)
    with pytest.raises(DPCError, match="shape"):
        new_class_prompt({**tuned, "ctx": torch.zeros(2, 512)}, tuned, 0.2)


# ---------------------------------------------------------------------------------------------
# Flag checks

def test_check_omegas():
    check_omegas(0.2, 1e-6)
    check_omegas(1.0, 0.0)
    check_omegas(1.0, 1.0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DPCError, match=r"--omega-b must be in \(0, 1\]"):
            check_omegas(bad, 0.0)
    for bad in (-1e-6, 1.01, float("nan")):
        with pytest.raises(DPCError, match=r"--omega-n must be in \[0, 1\]"):
            check_omegas(0.2, bad)


def test_check_topk():
    assert check_topk(8, 50) == 8
    assert check_topk(2, 2) == 2
    assert check_topk(8, 5) == 5  # clamped; train_dpc.main logs the warning (tests/test_train_dpc.py)
    for bad in (1, 0, -3):
        with pytest.raises(DPCError, match="--topk must be at least 2"):
            check_topk(bad, 50)
    with pytest.raises(DPCError, match="at least 2 base classes"):
        check_topk(2, 1)


# ---------------------------------------------------------------------------------------------
# Negative sampler (§3.3, docs/differences.md #7)

def test_sampler_small_example():
    # classes 0..4, two images each; batch of 3 with a repeated class
    pool = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    sampler = NegativeSampler(pool, n_base=5, topk=3, seed=0, min_negatives=0)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.0],   # gt 0: top-3 = 0, 1, 3 -> negatives 1 (in batch), 3
                           [0.1, 0.2, 0.3, 0.4, 0.5],   # gt 0 again: dropped as a positive
                           [0.0, 0.5, 0.9, 0.1, 0.6]])  # gt 1: top-3 = 2, 4, 1 -> K-1 = 2: 2, 4
    positives, pair_labels, negative_images = sampler.sample(scores, torch.tensor([0, 0, 1]))
    assert positives == [0, 2]
    assert pair_labels == [0, 1, 3, 2, 4]
    assert [pool[j] for j in negative_images] == [3, 2, 4]


def release_example():
    """A batch like the one issue-tracked against the released code: 4 images, 16 base classes, K = 8. Image 0
    ranks the other three ground truths among its top 8, so it keeps 5 hard negatives; images 1-3 rank only
    classes already in the mini-batch, so the filtering leaves them none."""
    labels = torch.tensor([0, 1, 2, 3])
    scores = torch.zeros(4, 16)
    for i, top in enumerate(([0, 1, 2, 4, 5, 6, 7, 8], [1, 0, 2, 3, 4, 5, 6, 7], [2, 0, 1, 3, 4, 5, 6, 8],
                             [3, 0, 1, 2, 4, 6, 7, 8])):
        scores[i, top] = torch.linspace(1.0, 0.5, 8)
    return labels, scores


def test_sampler_tops_up_to_two_negatives_as_the_released_code():
    labels, scores = release_example()
    pool = [c for c in range(16) for _ in range(3)]
    hard_only = NegativeSampler(pool, 16, 8, seed=0, min_negatives=0).sample(scores, labels)
    assert hard_only.pair_labels == [0, 1, 2, 3, 4, 5, 6, 7, 8] and len(hard_only.pair_labels) == 9
    picked = NegativeSampler(pool, 16, 8, seed=0).sample(scores, labels)      # the default: at least 2
    assert len(picked.pair_labels) == 15                                       # L of the released code
    assert picked.pair_labels[:9] == hard_only.pair_labels                     # image 0's group is unchanged
    drawn = picked.pair_labels[9:]
    assert len(set(picked.pair_labels)) == 15 and set(drawn) <= set(range(9, 16))   # never a class in the batch
    for c, j in zip(picked.pair_labels[4:], picked.negative_images):
        assert pool[j] == c                                                    # one pool image of its class
    # the release draws with randint(1, n - 2): never class 0 or n - 1; here every free class can be drawn
    seen = set()
    for seed in range(60):
        seen.update(NegativeSampler(pool, 16, 8, seed=seed).sample(scores, labels).pair_labels[9:])
    assert seen == set(range(9, 16))
    # the same seed draws the same classes and images, bit for bit
    assert NegativeSampler(pool, 16, 8, seed=5).sample(scores, labels) == NegativeSampler(pool, 16, 8, seed=5).sample(
        scores, labels)


def test_sampler_top_up_stops_when_the_classes_run_out():
    labels, scores = release_example()
    pool = [c for c in range(10) for _ in range(2)] + [12]          # classes 10, 11, 13-15 have no pool image
    picked = NegativeSampler(pool, 16, 8, seed=0).sample(scores, labels)
    assert picked.pair_labels[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(picked.pair_labels[9:]) == [9, 12]                  # the only free classes with an image
    assert NegativeSampler(pool, 16, 8, seed=0, min_negatives=5).sample(scores, labels).pair_labels[:9] == \
        picked.pair_labels[:9]


def test_sampler_skips_classes_without_pool_images():
    sampler = NegativeSampler([0, 2, 2], n_base=3, topk=3, seed=0)  # class 1 has no image
    _, pair_labels, negative_images = sampler.sample(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([0]))
    assert pair_labels == [0, 2] and negative_images in ([1], [2])


def test_sampler_refuses_bad_arguments():
    with pytest.raises(DPCError, match="check_topk"):
        NegativeSampler([0, 1], n_base=2, topk=3, seed=0)
    with pytest.raises(DPCError, match="--min-negatives"):
        NegativeSampler([0, 1], n_base=2, topk=2, seed=0, min_negatives=-1)
    with pytest.raises(DPCError, match="outside"):
        NegativeSampler([0, 5], n_base=3, topk=2, seed=0)


def random_case(rng: random.Random):
    b, n = rng.randint(1, 8), rng.randint(2, 30)
    k = min(rng.randint(2, 10), n)  # what check_topk returns (without printing in a loop)
    pool = [c for c in range(n) for _ in range(rng.randint(1, 5))]
    rng.shuffle(pool)
    scores = torch.rand(b, n, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    labels = torch.tensor([rng.randrange(n) for _ in range(b)])
    return b, n, k, pool, scores, labels


@pytest.mark.slow
def test_sampler_properties_over_random_batches():
    rng = random.Random(1234)
    for case in range(500):
        b, n, k, pool, scores, labels = random_case(rng)
        m = rng.choice((0, 1, 2, 3))
        if rng.random() < 0.3:   # some classes without a pool image
            pool = [c for c in pool if c % 3 or c in labels.tolist()] or pool
        assert check_topk(k, n) == k
        sampler = NegativeSampler(pool, n_base=n, topk=k, seed=case, min_negatives=m)
        positives, pair_labels, negative_images = sampler.sample(scores, labels)
        gt = labels.tolist()
        n_pos = len(positives)
        has_image = set(pool)

        assert all(0 <= c < n for c in pair_labels)
        assert len(pair_labels) == n_pos + len(negative_images) <= b * max(k, 1 + m)
        assert len(set(pair_labels)) == len(pair_labels)  # internal filtering
        # positives: the first image of each distinct ground-truth class, in batch order
        assert positives == sorted({gt.index(c) for c in set(gt)})
        assert pair_labels[:n_pos] == [gt[i] for i in positives]
        # every negative image is a pool image of the class it is paired with
        for c, j in zip(pair_labels[n_pos:], negative_images):
            assert 0 <= j < len(pool) and pool[j] == c

        # negatives come grouped by positive, in order; recover each group from its candidates
        negatives = pair_labels[n_pos:]
        seen, pos = set(pair_labels[:n_pos]), 0
        for i in positives:
            order = sorted(range(n), key=lambda c: (-scores[i, c].item(), c))[:k]  # top-K by score
            candidates = [c for c in order if c != gt[i]][:k - 1]
            expected = [c for c in candidates if c not in seen and c in has_image]
            group = negatives[pos:pos + len(expected)]
            assert group == expected  # from the top-K, in score order, ≤ K-1, maximal after filtering
            assert gt[i] not in group and len(group) <= k - 1
            seen.update(group)
            pos += len(group)
            # the top-up: random classes not yet in the batch, up to m negatives or until none is left
            free = {c for c in range(n) if c not in seen and c in has_image}
            drawn = negatives[pos:pos + min(max(m - len(group), 0), len(free))]
            assert set(drawn) <= free and len(set(drawn)) == len(drawn)
            seen.update(drawn)
            pos += len(drawn)
        assert pos == len(negatives)


def test_sampler_is_deterministic_per_seed():
    """main() reseeds the sampler from (seed, epoch) at every epoch, so a resumed run replays it."""
    n, k = 12, 4
    pool = [c for c in range(n) for _ in range(5)]
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(4, n, generator=g), torch.randint(0, n, (4,), generator=g)) for _ in range(6)]

    def run(sampler, batches):
        return [sampler.sample(s, y) for s, y in batches]

    a, b = NegativeSampler(pool, n, k, seed=3), NegativeSampler(pool, n, k, seed=3)
    assert run(a, cases) == run(b, cases)
    assert run(NegativeSampler(pool, n, k, seed=4), cases) != run(NegativeSampler(pool, n, k, seed=3), cases)
    a.rng.seed(7)
    b.rng.seed(7)  # as main() does at the start of an epoch
    assert run(a, cases) == run(b, cases)


@pytest.mark.parametrize("cache", [True, False])
def test_negatives_rendered_on_threads_equal_a_serial_loop(tmp_path, cache):
    """The thread pool only renders: the views come from torch's RNG in order, so the tensors (and the
    RNG state after them) are those of calling the dataset one image at a time."""
    toy_world.make_synthetic_imagefolder(str(tmp_path), n_classes=3, n_train=4, n_val=0, n_test=1, size=48)
    pool = data.ImageDataset(data.read_splits(str(tmp_path), "synthetic")["train"], data.train_transform(32), cache=cache)
    indices = [5, 0, 11, 5, 7, 2, 9]
    torch.manual_seed(0)
    serial = [pool[j][0] for j in indices]
    after_serial = torch.rand(1)
    with ThreadPoolExecutor(3) as threads:
        torch.manual_seed(0)
        parallel = data.augmented_images(pool, indices, threads)
        after_parallel = torch.rand(1)
    assert len(parallel) == len(indices) and all(torch.equal(a, b) for a, b in zip(serial, parallel))
    assert torch.equal(after_serial, after_parallel)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(serial, data.augmented_images(pool, indices, None)))
