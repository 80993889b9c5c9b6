"""Speed benchmark: step times of every stage as ratios to the frozen encoders' own cost, in one run.

A script, not a test. Random weights (speed does not depend on them); random tensors in place of
images for the step ratios, synthetic photos where loading is part of what is measured (DPC's
negatives, data wait, evaluation).

    python tools/bench.py --arch ViT-B/16 --batch 4 --classes 50 --eval-images 200   # CPU figures in docs/speed.md
    python tools/bench.py --arch ViT-B/16 --batch 32 --classes 50 --device cuda

Prints a table and writes bench.json:
  text_eot   text encoder over C class prompts, EOT-truncated vs full 77 tokens (speedup, max rel diff)
  <learner>  training step (forward + backward + SGD) at --batch over its floor, the passes its loss
             cannot avoid: CoOp image fwd + text fwd/bwd; MaPLe image fwd/bwd + text fwd/bwd;
             PromptSRC that + a frozen image fwd; PromptKD image fwd/bwd + teacher image fwd
             (teacher text is cached); also over the text-side floor (image fwd + text fwd/bwd)
             and, but for PromptKD, the same step with DePT's head (prompts.DePT) over the plain step
  dpc        one DPC step (train_dpc.dpc_step at b = 4, K = 8 -> L <= 32 pairs, negatives rendered
             from decoded photos; plus its backward and SGD step) against a CoOp backbone step on 32
             images, and the sampler's share (for CoOp: scores, sampling, rendering the negatives)
  data_wait  share of CoOp backbone steps spent waiting for the training scripts' DataLoader
  eval       (a) images/s through scoring.accuracy (PNG decode, transform, DataLoader) over raw
             encode_image images/s
  cache      (g) a 9-value ω_n sweep of a CoOp DPC run over one evaluation; (h) the DPC stage's
             evaluation of a CoOp backbone (features cached by the backbone run) over a fresh image pass
  pipeline   (i) seconds in image encoding, feature cache off vs on, of README's main job (toy world) and
             of a Tab. 2 evaluation of 3 seeds x (CoOp, + DPC) on the source and 2 targets
  memory     (--memory) what a training step holds per learner at ImageNet scale (--memory-classes 500
             ImageNet-like names, --memory-batch 32, bf16 autocast, --memory-arch ViT-B/16; PromptKD's
             teacher ViT-L/14): activations saved for backward (saved_tensors_hooks, each storage once)
             + model/optimizer (fp32 CLIP and teacher weights, bf16 weight copies kept for backward,
             trainable tensors + gradients + SGD momentum, cached prompt tokens/text features), against
             --memory-goal GB; plus the process memory growth across the forward as a check

    python tools/bench.py --memory               # only the memory section (merged into --out)
    python tools/bench.py --memory also ...      # the speed sections and the memory section
"""
import argparse
import ctypes
import functools
import itertools
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_model  # noqa: E402
import data  # noqa: E402
import precision  # noqa: E402
import prompts  # noqa: E402
import scoring  # noqa: E402
import toy_world  # noqa: E402
import train_backbone as tb  # noqa: E402
import train_dpc  # noqa: E402


def timed(fn, repeats, device):
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


class NoisySampler(train_dpc.NegativeSampler):
    """A random CLIP ranks every image alike, so its top-K sets coincide and deduplication shrinks L;
    noise on the (still computed) scores gives the L ~ b*K of a trained backbone."""

    def sample(self, scores, labels):
        return super().sample(scores + 100 * torch.randn_like(scores), labels)


# ------------------------------------------------------------------------------------------------
# Memory of a training step at ImageNet scale
# ------------------------------------------------------------------------------------------------

GB = 1e9  # bytes; decimal GB is the stricter reading of a "16 GB" card (16 GiB = 17.2e9 bytes)

# Real names of CLIP's ImageNet class list (the one CoOp/MaPLe/PromptSRC read), picked to span its BPE
# lengths: plain nouns 1-3 tokens, breeds 3-5, hyphenated or German/Latin names 5-7, and the longest
# of the list, "Mexican hairless dog (xoloitzcuintli)", 12.
IMAGENET_NAMES = [
    "goldfish", "tench", "great white shark", "tiger cat", "Egyptian Mau", "cassette player",
    "Christmas stocking", "Polaroid camera", "Windsor tie", "CRT monitor", "dishrag", "Newfoundland dog",
    "Granny Smith apple", "Chesapeake Bay Retriever", "Pembroke Welsh Corgi", "Carolina anole", "T-shirt",
    "Staffordshire Bull Terrier", "Saharan horned viper", "Komondor", "Kuvasz", "Schipperke",
    "German Shorthaired Pointer", "Greater Swiss Mountain Dog", "Rhodesian Ridgeback", "Sealyham Terrier",
    "West Highland White Terrier", "Dungeness crab", "split-rail fence", "yellow lady's slipper",
    "common gallinule", "Dandie Dinmont Terrier", "Treeing Walker Coonhound", "hen of the woods mushroom",
    "eastern diamondback rattlesnake", "one-piece bathing suit", "ring-necked snake", "hand-held computer",
    "Bouvier des Flandres dog", "Soft-coated Wheaten Terrier", "eastern hog-nosed snake",
    "Appenzeller Sennenhund", "Entlebucher Sennenhund", "red-breasted merganser", "sulphur-crested cockatoo",
    "black-and-white colobus", "Mexican hairless dog (xoloitzcuintli)"]
# Two names longer than any in CLIP's list (14 and 15 tokens), as a margin: the text tower runs to the
# longest EOT of the batch, so the longest name alone sets the cost of every class.
LONG_NAMES = ["eastern hog-nosed snake (heterodon platirhinos)", "Bouvier des Flandres dog (Vlaamse koehond)"]
# Share of names with 1..10 BPE tokens: the lengths of the real names above, widened to mean ~3.5
# (most names 1-4 words, hyphens and parentheses are tokens of their own, rare words split in 2-4).
NAME_TOKENS = {1: .15, 2: .22, 3: .20, 4: .16, 5: .11, 6: .07, 7: .04, 8: .02, 9: .015, 10: .015}


def imagenet_like_names(n: int, seed: int = 0) -> list:
    """n distinct class names whose BPE lengths follow NAME_TOKENS: the real names above, then names
    of k common one-token words filling each length bucket, then LONG_NAMES (n >= 50)."""
    tok = clip_model.tokenizer()
    names = list(IMAGENET_NAMES)
    lengths = [len(tok.encode(name)) for name in names + LONG_NAMES]
    words = [w[:-4] for w in list(tok.encoder)[2000:20000]   # common whole words, one token each
             if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and 4 <= len(w) - 4 <= 9]
    rng = random.Random(seed)
    synthetic = {k: [" ".join(rng.sample(words, k)) for _ in range(round(share * n) - lengths.count(k))]
                 for k, share in NAME_TOKENS.items()}
    surplus = len(lengths) + sum(map(len, synthetic.values())) - n  # the real names outside NAME_TOKENS
    synthetic[2] = synthetic[2][:len(synthetic[2]) - max(surplus, 0)]   # come out of the largest bucket
    names += [name for bucket in synthetic.values() for name in bucket]
    while len(names) < n - len(LONG_NAMES):
        names.append(" ".join(rng.sample(words, 3)))
    names = list(dict.fromkeys(names))[:n - len(LONG_NAMES)] + LONG_NAMES  # the longest names stay in
    assert len(set(names)) == n, "duplicate class names"
    return names


class SavedForBackward:
    """Every distinct storage autograd saves for backward inside the context (each counted once).

    The pack hook sees a tensor when an op saves it (inputs, outputs, casts); views of one storage
    (q/k/v chunks, transposes) count once, as the whole storage."""

    def __init__(self):
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in self.storages:
            self.storages[s.data_ptr()] = t
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def split(self, module) -> dict:
        """Bytes of the saved storages that are `module`'s parameters/buffers (saved by reference, no new
        memory), low-precision copies of them (autocast's casts kept for backward), and activations."""
        tensors = list(module.parameters()) + list(module.buffers())
        own = {p.untyped_storage().data_ptr() for p in tensors}
        by_numel = {}
        for p in tensors:
            by_numel.setdefault(p.numel(), []).append(p)
        out = dict(parameters=0, weight_copies=0, activations=0)
        for ptr, t in self.storages.items():
            s = t.untyped_storage()
            if ptr in own:
                out["parameters"] += s.nbytes()
                continue
            if t.dtype in (torch.bfloat16, torch.float16):
                n = s.nbytes() // t.element_size()
                flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(s, 0, (n,), (1,))   # the whole storage
                if any(torch.equal(flat, p.detach().to(t.dtype).reshape(-1)) for p in by_numel.get(flat.numel(), ())):
                    out["weight_copies"] += s.nbytes()
                    continue
            out["activations"] += s.nbytes()
        return out


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) cache of tensors, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def module_bytes(module) -> int:
    return sum(t.untyped_storage().nbytes() for t in itertools.chain(module.parameters(), module.buffers()))


def reset_peak(dev):
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
            f.write("5")


def peak_memory(dev) -> int:
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def process_memory(dev) -> int:
    """Bytes in use now: the CUDA allocator's, or on CPU the resident set after handing freed heap pages
    back (malloc_trim), so the figure is what live tensors hold, not what glibc keeps cached."""
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS then includes the allocator's free pages
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_section(arch, teacher_arch, n_classes, batch, learners, goal_gb, dev, backward=False):
    """Per learner: what one training step at n_classes x batch keeps until its backward, in GB."""
    names = imagenet_like_names(n_classes)
    lengths = [len(clip_model.tokenizer().encode(n)) for n in names]
    torch.manual_seed(0)
    clip = clip_model.random_clip(arch).to(dev)
    size = clip.visual.input_resolution
    images = torch.randn(batch, 3, size, size, device=dev)
    labels = torch.arange(batch, device=dev) % n_classes
    autocast = functools.partial(torch.autocast, dev, dtype=torch.bfloat16)  # the GPU's precision, also on CPU
    out = dict(arch=arch, teacher_arch=teacher_arch, classes=n_classes, batch=batch, goal_gb=goal_gb,
               precision="bf16 autocast",
               name_tokens=dict(mean=sum(lengths) / len(lengths), max=max(lengths),
                                histogram={k: lengths.count(k) for k in sorted(set(lengths))}))
    teacher_clip = None
    for name in learners:
        if name == "promptkd":  # a PromptSRC learner on its own CLIP (ViT-L/14) as the teacher
            teacher_clip = teacher_clip or clip_model.random_clip(teacher_arch).to(dev)
            teacher = prompts.PromptSRC(teacher_clip).to(dev)
        else:
            teacher = None
        learner = prompts.build_learner(name, clip, teacher).to(dev).train()
        trainable = prompts.trainable_parameters(learner)
        # what a run computes once and then keeps: prompt tokens + embeddings (C, 77, D) per learner,
        # PromptKD's teacher text features (computed here, under no_grad as in training); PromptSRC's
        # frozen text target is the mean over 60 templates in fp32 (minutes on CPU): a stand-in of its shape
        with torch.no_grad(), autocast():
            if name == "promptkd":
                learner.teacher_text_features(names)
            else:
                prompts.class_prompts(clip, names, learner.prefix, learner.cache)
            if name == "promptsrc":
                learner.fixed_cache[tuple(names)] = torch.randn(n_classes, clip.text_projection.shape[1],
                                                                device=dev)
        # text positions the step's text tower runs (PromptKD's step has no text pass: cached teacher text)
        t_text = (None if teacher is not None
                  else int(learner.cache[(learner.prefix, tuple(names))][0].argmax(-1).max()) + 1)
        before = process_memory(dev)
        if backward:
            reset_peak(dev)
        t0 = time.perf_counter()
        with SavedForBackward() as saved, autocast():
            loss = learner.training_loss(images, labels, names)["loss"]
        forward_s = time.perf_counter() - t0
        grown = process_memory(dev) - before
        split = saved.split(learner)
        del saved
        if backward:  # the rest of the step, for the measured peak (gradients of activations are transient)
            opt = torch.optim.SGD(trainable.values(), lr=1e-3, momentum=0.9)
            loss.backward()
            opt.step()
            step_peak = peak_memory(dev) - before
            del opt
        del loss
        weights = module_bytes(clip) + (module_bytes(teacher) if teacher is not None else 0)
        train_bytes = sum(p.untyped_storage().nbytes() for p in trainable.values())
        caches = tensor_bytes([learner.__dict__.get(k) for k in ("cache", "fixed_cache", "teacher_text_cache")]
                              + ([teacher.cache] if teacher is not None else []))
        model = weights + split["weight_copies"] + 3 * train_bytes + caches  # trainable + gradient + momentum
        total = split["activations"] + model
        out[name] = dict(
            T=t_text, activations_gb=split["activations"] / GB,
            weight_copies_gb=split["weight_copies"] / GB, weights_fp32_gb=weights / GB,
            trainable_grad_momentum_gb=3 * train_bytes / GB, caches_gb=caches / GB, model_optimizer_gb=model / GB,
            total_gb=total / GB, meets_goal=total <= goal_gb * GB,
            saved_parameters_by_reference_gb=split["parameters"] / GB,
            forward_s=forward_s, process_growth_gb=grown / GB,
            process_growth_over_saved=grown / (split["activations"] + split["weight_copies"]))
        if backward:  # resident before the step (weights, caches, trainable) + the step's measured peak growth
            out[name].update(step_peak_growth_gb=step_peak / GB,
                             step_peak_over_saved=step_peak / (split["activations"] + split["weight_copies"]),
                             measured_total_gb=(weights + 1 * train_bytes + caches + step_peak) / GB)
        del learner, teacher, trainable
    # what the 77-token text tower of the original CoOp would keep: CoOp's text side on a 50-class subset
    # holding the longest name, cut at the longest EOT vs run to 77 (its activations are linear in C)
    coop = prompts.CoOp(clip).to(dev)
    subset = names if n_classes <= 50 else names[:50 - len(LONG_NAMES)] + LONG_NAMES  # names end with them
    text_act = {}
    for truncate in (True, False):
        clip.encode_text_embeddings = functools.partial(type(clip).encode_text_embeddings, clip,
                                                        truncate=truncate)  # an instance attribute, deleted below
        try:
            with SavedForBackward() as saved, autocast():
                features = coop.encode_text(subset)
            text_act[truncate] = saved.split(coop)["activations"] * n_classes / len(subset)
            del features, saved
        finally:
            del clip.encode_text_embeddings
    out["coop_text_77"] = dict(text_activations_T_gb=text_act[True] / GB,
                               text_activations_77_gb=text_act[False] / GB,
                               ratio=text_act[False] / text_act[True],
                               coop_total_77_gb=out["coop"]["total_gb"] + (text_act[False] - text_act[True]) / GB
                               if "coop" in out else None)
    return out


def print_memory(m):
    h = m["name_tokens"]
    print(f"memory of a training step: {m['arch']}, {m['classes']} ImageNet-like classes (name tokens mean "
          f"{h['mean']:.1f}, max {h['max']}), batch {m['batch']}, {m['precision']}; GB = 1e9 bytes")
    print(f"{'learner':10s} {'T':>3s} {'activ.':>7s} {'bf16 w':>7s} {'fp32 w':>7s} {'train×3':>7s} {'caches':>7s} "
          f"{'model+opt':>9s} {'total':>7s}  <= {m['goal_gb']:g} GB   growth/saved")
    for name, o in m.items():
        if isinstance(o, dict) and "total_gb" in o:
            print(f"{name:10s} {o['T'] or '-':>3} {o['activations_gb']:7.2f} {o['weight_copies_gb']:7.2f} "
                  f"{o['weights_fp32_gb']:7.2f} "
                  f"{o['trainable_grad_momentum_gb']:7.3f} {o['caches_gb']:7.3f} {o['model_optimizer_gb']:9.2f} "
                  f"{o['total_gb']:7.2f}  {'pass' if o['meets_goal'] else 'FAIL':>9s}   "
                  f"{o['process_growth_over_saved']:.2f}"
                  + (f"   step peak {o['measured_total_gb']:.2f} GB" if "measured_total_gb" in o else ""))
    c = m["coop_text_77"]
    print(f"CoOp text tower at {m['classes']} classes: activations {c['text_activations_T_gb']:.2f} GB cut at T vs "
          f"{c['text_activations_77_gb']:.2f} GB at 77 tokens ({c['ratio']:.1f}x)"
          + (f"; a CoOp step at 77 tokens: {c['coop_total_77_gb']:.2f} GB" if c["coop_total_77_gb"] else ""))


def memory(args, dev):
    return memory_section(args.memory_arch, args.memory_teacher, args.memory_classes, args.memory_batch,
                          args.learners.split(","), args.memory_goal, dev, args.memory_backward)


# ------------------------------------------------------------------------------------------------
# Image passes that cannot change: the feature cache of evaluation (scoring.image_features)
# ------------------------------------------------------------------------------------------------

class EncodeTimer:
    """Seconds spent in real image passes (scoring.encode_images) while it is installed."""

    def __init__(self):
        self.seconds, self.calls, self.real = 0.0, 0, scoring.encode_images

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.real(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __enter__(self):
        scoring.encode_images = self
        return self

    def __exit__(self, *exc):
        scoring.encode_images = self.real


def cache_section(coop, items, dev, workers) -> dict:
    """(g) a 9-value ω_n sweep of a CoOp DPC run over one evaluation; (h) the DPC stage's evaluation of a
    CoOp backbone (its features on disk from the backbone run, a new process) over the same evaluation
    with the cache off, i.e. a fresh image pass."""
    names = data.classnames_of(items)
    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(coop).items()}
    parallel = {n: t + 0.01 * torch.randn_like(t) for n, t in tuned.items()}
    cache = tempfile.mkdtemp(prefix="bench_cache_")
    values = (0, 1e-6, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

    def evaluate(omega_n, where):
        prompt = train_dpc.new_class_prompt(parallel, tuned, omega_n)
        return scoring.accuracy(coop, items, names, dev, workers, prompt, cache=where)

    t0 = time.perf_counter()
    evaluate(1e-6, "off")
    one = time.perf_counter() - t0
    scoring._MEMO.clear()
    t0 = time.perf_counter()
    for v in values:
        evaluate(v, cache)            # the first value encodes (and writes the cache), the others reuse
    sweep = time.perf_counter() - t0
    scoring._MEMO.clear()                  # the DPC run is another process: only the disk cache is left
    del coop.clip._digest             # ... which hashes its CLIP's weights once
    clip_digest_s = time.perf_counter()
    scoring.clip_digest(coop.clip)
    clip_digest_s = time.perf_counter() - clip_digest_s
    del coop.clip._digest             # paid again inside the DPC evaluation below
    t0 = time.perf_counter()
    evaluate(1e-6, cache)
    dpc_eval = time.perf_counter() - t0
    return dict(images=len(items), sweep_values=len(values), one_evaluation_s=one, sweep_s=sweep,
                sweep_over_one_evaluation=sweep / one, dpc_stage_evaluation_s=dpc_eval,
                dpc_stage_over_fresh_pass=dpc_eval / one, clip_digest_s=clip_digest_s)


def pipeline_section(workers) -> dict:
    """(i) time in image encoding of the README main job (toy world: CoOp backbone, + DPC, evaluate.py
    --zero-shot) and of a Tab. 2 evaluation of several CoOp runs (3 seeds x backbone and DPC, on the
    source and 2 targets), with the feature cache as the scripts default to it and with it off."""
    import evaluate  # noqa: E402 (needs the repository on sys.path, set above)
    out = {}
    for cache in ("off", "on"):
        base = tempfile.mkdtemp(prefix=f"bench_pipeline_{cache}_")
        flag = ["--feature-cache", "off" if cache == "off" else os.path.join(base, "features")]
        root = ["--root", os.path.join(base, "data"), "--workers", str(workers)]
        scoring._MEMO.clear()
        cwd = os.getcwd()
        os.chdir(base)
        try:
            with EncodeTimer() as timer:
                t0 = time.perf_counter()
                tb.main(tb.get_args(["--learner", "coop", "--data", "toy", "--clip", "toy"] + root + flag))
                train_dpc.main(train_dpc.get_args(["--topk", "8", "--workers", str(workers)] + flag))
                evaluate.main(evaluate.get_args(["output/toy", "--zero-shot", "--workers", str(workers)] + flag))
                main_job = dict(total_s=time.perf_counter() - t0, encode_s=timer.seconds, passes=timer.calls)
            for seed in (1, 2, 3):   # Tab. 2 sources (short runs: only their evaluation is measured)
                src = f"tab2/coop/seed{seed}"
                tb.main(tb.get_args(["--learner", "coop", "--data", "toy", "--clip", "toy", "--subsample", "all",
                                     "--epochs", "2", "--seed", str(seed), "--output-dir", src] + root + flag))
                train_dpc.main(train_dpc.get_args(["--backbone", src, "--epochs", "1", "--workers", str(workers),
                                                   "--output-dir", f"tab2/coop_dpc/seed{seed}"] + flag))
            toy_world.make_synthetic_imagefolder(os.path.join(base, "data"), "target_a", size=32, n_test=40)
            toy_world.make_synthetic_imagefolder(os.path.join(base, "data"), "target_b", size=32, n_test=40, seed=1)
            scoring._MEMO.clear()   # evaluate.py is a process of its own
            with EncodeTimer() as timer:
                t0 = time.perf_counter()
                evaluate.main(evaluate.get_args(["tab2", "--target", "target_a,target_b", "--out", "tab2_eval"]
                                                + root[2:] + ["--target-root", root[1]] + flag))
                tab2 = dict(total_s=time.perf_counter() - t0, encode_s=timer.seconds, passes=timer.calls)
        finally:
            os.chdir(cwd)
        out[cache] = dict(main_job=main_job, tab2=tab2)
    for part in ("main_job", "tab2"):
        out[f"{part}_encode_on_over_off"] = out["on"][part]["encode_s"] / out["off"][part]["encode_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B/16", choices=list(clip_model.ARCHS))
    p.add_argument("--batch", type=int, default=4, help="backbone batch for the per-learner step")
    p.add_argument("--classes", type=int, default=10, help="base classes (EuroSAT 5, ImageNet 500)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--learners", default="coop,maple,promptsrc,promptkd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-images", type=int, default=400, help="synthetic test images for (a)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes for (a) and the data-wait "
                   "measure, threads rendering DPC's negatives (the training scripts' default)")
    p.add_argument("--photo-size", type=int, default=400, help="side of the synthetic photos negatives are cut from")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--skip-pipeline", action="store_true", help="skip (i), the toy-world pipeline with and without "
                   "the feature cache (about 3 minutes on 2 CPU cores)")
    p.add_argument("--memory", nargs="?", const="only", default="no", choices=["no", "only", "also"],
                   help="memory of a training step at ImageNet scale: alone (--memory: written into --out, "
                   "its other sections kept) or after the speed sections (--memory also)")
    p.add_argument("--memory-classes", type=int, default=500, help="classes of the memory section "
                   "(ImageNet's base half: 500)")
    p.add_argument("--memory-batch", type=int, default=32)
    p.add_argument("--memory-arch", default="ViT-B/16", choices=list(clip_model.ARCHS))
    p.add_argument("--memory-teacher", default="ViT-L/14", choices=list(clip_model.ARCHS),
                   help="PromptKD's teacher CLIP")
    p.add_argument("--memory-backward", action="store_true", help="also run each step's backward + SGD step and "
                   "measure the process's peak over the step (CPU: VmHWM; CUDA: max_memory_allocated)")
    p.add_argument("--memory-goal", type=float, default=12.0, help="GB a step may hold, CLIP included")
    args = p.parse_args()
    dev, r = args.device, args.repeats
    if dev.startswith("cuda"):   # cuda:N: its synchronize and memory counters, not GPU 0's
        torch.cuda.set_device(torch.device(dev))
    machine = (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {dev}"
               + (f" {torch.cuda.get_device_name(torch.device(dev))}" if dev.startswith("cuda") else ""))
    if args.memory == "only":
        out = json.load(open(args.out)) if os.path.isfile(args.out) else dict(machine=machine)
        out["memory"] = dict(memory(args, dev), machine=machine)
        print_memory(out["memory"])
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        return
    torch.manual_seed(0)
    clip = clip_model.random_clip(args.arch).to(dev)
    size = clip.visual.input_resolution
    names = [f"class number {i} of the benchmark" for i in range(args.classes)]
    out = dict(machine=machine, arch=args.arch, batch=args.batch,
               classes=args.classes, threads=torch.get_num_threads())

    # (e) text encoder: EOT truncation
    tokens = clip_model.tokenize([f"a photo of a {n}." for n in names]).to(dev)
    emb = clip.token_embeddings(tokens)
    with torch.no_grad(), precision.autocast(dev):
        full = timed(lambda: clip.encode_text_embeddings(emb, tokens, truncate=False), r, dev)
        short = timed(lambda: clip.encode_text_embeddings(emb, tokens, truncate=True), r, dev)
        a = clip.encode_text_embeddings(emb, tokens, truncate=False).float()
        b = clip.encode_text_embeddings(emb, tokens, truncate=True).float()
    out["text_eot"] = dict(full_s=full, truncated_s=short, speedup=full / short,
                           max_rel_diff=((a - b).abs().max() / a.abs().max()).item())

    # the passes no training step can avoid: the image encoder on the batch (frozen forward, or forward +
    # backward when the learner prompts the image side) and the text encoder forward + backward
    images = torch.randn(args.batch, 3, size, size, device=dev)
    labels = torch.arange(args.batch, device=dev) % args.classes
    coop = prompts.CoOp(clip).to(dev)
    visual_prompt = torch.zeros(4, clip.visual.conv1.weight.shape[0], device=dev, requires_grad=True)

    def image_forward():
        with torch.no_grad(), precision.autocast(dev):
            clip.encode_image(images)

    def image_forward_backward():
        with precision.autocast(dev):
            clip.encode_image(images, visual_prompt).float().sum().backward()

    def text_forward_backward():
        with precision.autocast(dev):
            coop.encode_text(names).float().sum().backward()

    t_img, t_img_train, t_txt = (timed(f, r, dev) for f in (image_forward, image_forward_backward, text_forward_backward))
    # floor per learner (its own loss decides which passes are unavoidable); "text" is the issue's
    # single definition for all: frozen image forward + text forward/backward
    floors = dict(text=t_img + t_txt,
                  coop=t_img + t_txt,
                  maple=t_img_train + t_txt,
                  promptsrc=t_img_train + t_txt + t_img,   # + frozen CLIP's image features (its L1/KL targets)
                  promptkd=t_img_train + t_img)            # no text pass (cached teacher text); + teacher images
    out["floors_s"] = floors

    def training_step(model):
        """One forward + backward + SGD step of `model`'s training loss on the batch."""
        opt = torch.optim.SGD(prompts.trainable_parameters(model).values(), lr=1e-3, momentum=0.9)

        def step():
            with precision.autocast(dev):
                loss = model.training_loss(images, labels, names)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    for name in args.learners.split(","):
        teacher = prompts.PromptSRC(clip).to(dev) if name == "promptkd" else None
        learner = prompts.build_learner(name, clip, teacher).to(dev).train()

        t = timed(training_step(learner), r, dev)
        out[name] = dict(step_s=t, step_over_floor=t / floors[name], step_over_text_floor=t / floors["text"],
                         images_per_s=args.batch / t)
        if name != "promptkd":   # the same step with DePT's head (Fig. 5): FiLM maps, linear head, 2B-row loss
            t_dept = timed(training_step(prompts.DePT(learner, names).to(dev).train()), r, dev)
            out[name].update(dept_step_s=t_dept, dept_step_over_step=t_dept / t)

    # (c), (d): DPC step at b = 4, K = 8 vs a CoOp backbone step on 32 images
    b, k = 4, min(8, args.classes)
    coop_images = torch.randn(32, 3, size, size, device=dev)
    coop_labels = torch.arange(32, device=dev) % args.classes
    opt = torch.optim.SGD([coop.ctx], lr=1e-3, momentum=0.9)

    def coop_step(x, y):
        with precision.autocast(dev):
            loss = coop.training_loss(x, y, names)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(coop).items()}
    parallel = train_dpc.initial_parallel_prompt(tuned)
    dpc_opt = torch.optim.SGD(parallel.values(), lr=1e-3, momentum=0.9)
    # the negative pool: decoded PIL images of a typical photo size, as train_dpc.py keeps them
    folder = toy_world.make_synthetic_imagefolder(tempfile.mkdtemp(), "pool", n_classes=args.classes, n_train=4, n_val=0,
                                                  n_test=1, size=args.photo_size)
    pool = data.train_set(data.read_splits(os.path.dirname(folder), "pool")["train"], size)
    sampler = NoisySampler([item.label for item in pool.items], args.classes, k, 0)
    threads = ThreadPoolExecutor(args.workers) if args.workers > 0 else None
    with torch.no_grad(), precision.autocast(dev):
        tuned_text = F.normalize(coop.encode_text(names).float(), dim=-1)
    sampler_time, pairs = [0.0], []

    def dpc_step():  # train_dpc.py's own step, then its backward and SGD step
        step = train_dpc.dpc_step(coop, coop_images[:b], coop_labels[:b].cpu(), sampler, pool, threads, tuned,
                                  tuned_text, parallel, names, 100.0, dev)
        dpc_opt.zero_grad()
        step.loss.backward()
        dpc_opt.step()
        sampler_time[0] += step.sampler_s
        pairs.append(step.pairs)

    coop32 = timed(lambda: coop_step(coop_images, coop_labels), r, dev)
    sampler_time[0] = 0.0
    dpc = timed(dpc_step, r, dev)
    out["dpc"] = dict(step_s=dpc, coop_step_32_s=coop32, dpc_over_coop32=dpc / coop32,
                      sampler_share=sampler_time[0] / (r + 1) / dpc, mean_pairs_L=sum(pairs) / len(pairs))
    # data wait: CoOp backbone steps fed by the training scripts' loader (the photos, train augmentation)
    waits, steps = [], []
    t_last = time.perf_counter()
    for x, y, _ in itertools.islice(data.make_loader(pool, args.batch, True, args.workers, drop_last=True), 12):
        t0 = time.perf_counter()
        waits.append(t0 - t_last)
        coop_step(x.to(dev), y.to(dev))
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t_last = time.perf_counter()
        steps.append(t_last - t0)
    out["data_wait"] = dict(share=sum(waits[1:]) / (sum(waits[1:]) + sum(steps[1:])), steps=len(steps) - 1,  # 1st: start-up
                            batch=args.batch, workers=args.workers, photo_size=args.photo_size)
    # (a) evaluation through scoring.accuracy (decode + transform + loader) vs raw encode_image
    folder = toy_world.make_synthetic_imagefolder(tempfile.mkdtemp(), "bench", n_classes=10, n_train=1, n_val=0,
                                                  n_test=args.eval_images // 10, size=size)
    items = data.read_splits(os.path.dirname(folder), "bench")["test"]
    raw_images = torch.randn(100, 3, size, size, device=dev)

    def raw():
        with torch.no_grad(), precision.autocast(dev):
            for _ in range(len(items) // 100):
                clip.encode_image(raw_images)

    t_raw = timed(raw, 1, dev)
    t_eval = timed(lambda: scoring.accuracy(coop, items, data.classnames_of(items), dev, args.workers), 1, dev)
    out["eval"] = dict(images=len(items), raw_images_per_s=len(items) / t_raw, eval_images_per_s=len(items) / t_eval,
                       eval_over_raw_throughput=t_raw / t_eval, workers=args.workers)

    out["cache"] = cache_section(coop, items, dev, args.workers)
    if not args.skip_pipeline:
        out["pipeline"] = pipeline_section(args.workers)

    out["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda")
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    print(f"machine: {out['machine']}, {args.arch}, {args.classes} classes, {out['threads']} threads")
    t = out["text_eot"]
    print(f"text encoder EOT truncation: {t['speedup']:.2f}x faster, max rel diff {t['max_rel_diff']:.1e}")
    e = out["eval"]
    print(f"evaluation: {e['eval_images_per_s']:.1f} img/s through accuracy() vs {e['raw_images_per_s']:.1f} img/s raw "
          f"encode_image = {e['eval_over_raw_throughput']:.2f} ({e['workers']} workers)")
    print(f"passes on {args.batch} images / {args.classes} prompts: image fwd {t_img:.3f} s, image fwd+bwd "
          f"{t_img_train:.3f} s, text fwd+bwd {t_txt:.3f} s")
    for name in args.learners.split(","):
        o = out[name]
        print(f"{name:10s} step {o['step_s']:.3f} s = {o['step_over_floor']:.2f} x its floor "
              f"({floors[name]:.3f} s), {o['step_over_text_floor']:.2f} x the text-side floor"
              + (f"; + DePT's head: {o['dept_step_over_step']:.3f} x that step" if "dept_step_over_step" in o else ""))
    d = out["dpc"]
    print(f"DPC step (b=4, K={k}, mean L {d['mean_pairs_L']:.1f}) = {d['dpc_over_coop32']:.2f} x CoOp step on 32 images; sampler share "
          f"{100 * d['sampler_share']:.1f}%")
    w = out["data_wait"]
    print(f"data wait: {100 * w['share']:.1f}% of CoOp steps at batch {args.batch} ({w['workers']} workers, "
          f"{w['photo_size']} px photos, {w['steps']} steps)")
    c = out["cache"]
    print(f"feature cache ({c['images']} images): {c['sweep_values']}-value ω_n sweep = {c['sweep_over_one_evaluation']:.2f} x "
          f"one evaluation; the DPC stage's evaluation of a CoOp backbone = {c['dpc_stage_over_fresh_pass']:.3f} x a "
          f"fresh image pass (CLIP digest {c['clip_digest_s']:.2f} s)")
    if "pipeline" in out:
        q = out["pipeline"]
        for part, what in (("main_job", "README main job"), ("tab2", "Tab. 2 evaluation of 3 seeds x (CoOp, + DPC)")):
            off, on = q["off"][part], q["on"][part]
            print(f"{what}: image encoding {off['encode_s']:.1f} s of {off['total_s']:.1f} s ({off['passes']} passes) "
                  f"without the cache, {on['encode_s']:.1f} s of {on['total_s']:.1f} s ({on['passes']} passes) with it: "
                  f"{q[part + '_encode_on_over_off']:.2f} x")
    print(f"peak memory {out['peak_memory_mb']:.0f} MB")
    if args.memory == "also":
        out["memory"] = dict(memory(args, dev), machine=machine)
        print_memory(out["memory"])
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
