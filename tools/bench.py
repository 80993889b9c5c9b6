"""Speed benchmark: step times of every stage as ratios to the frozen encoders' own cost, in one run.

A script, not a test. Random weights (speed does not depend on them); random tensors in place of
images for the step ratios, synthetic photos where loading is part of what is measured (DPC's
negatives, data wait, evaluation).

    python tools/bench.py --arch ViT-B/16 --batch 4 --classes 50 --eval-images 200   # CPU figures in README
    python tools/bench.py --arch ViT-B/16 --batch 32 --classes 50 --device cuda

Prints a table and writes bench.json:
  text_eot   text encoder over C class prompts, EOT-truncated vs full 77 tokens (speedup, max rel diff)
  <learner>  training step (forward + backward + SGD) at --batch over its floor, the passes its loss
             cannot avoid: CoOp image fwd + text fwd/bwd; MaPLe image fwd/bwd + text fwd/bwd;
             PromptSRC that + a frozen image fwd; PromptKD image fwd/bwd + teacher image fwd
             (teacher text is cached); also over the text-side floor (image fwd + text fwd/bwd)
  dpc        one DPC step (train_dpc.dpc_step at b = 4, K = 8 -> L <= 32 pairs, negatives rendered
             from decoded photos; plus its backward and SGD step) against a CoOp backbone step on 32
             images, and the sampler's share (for CoOp: scores, sampling, rendering the negatives)
  data_wait  share of CoOp backbone steps spent waiting for the training scripts' DataLoader
  eval       (a) images/s through train_backbone.accuracy (PNG decode, transform, DataLoader) over raw
             encode_image images/s
"""
import argparse
import itertools
import json
import os
import platform
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
import prompts  # noqa: E402
import train_backbone as tb  # noqa: E402
import train_dpc  # noqa: E402


def timed(fn, repeats, device):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


class NoisySampler(train_dpc.NegativeSampler):
    """A random CLIP ranks every image alike, so its top-K sets coincide and deduplication shrinks L;
    noise on the (still computed) scores gives the L ~ b*K of a trained backbone."""

    def sample(self, scores, labels):
        return super().sample(scores + 100 * torch.randn_like(scores), labels)


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
    args = p.parse_args()
    dev, r = args.device, args.repeats
    torch.manual_seed(0)
    clip = clip_model.random_clip(args.arch).to(dev)
    size = clip.visual.input_resolution
    names = [f"class number {i} of the benchmark" for i in range(args.classes)]
    out = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {dev}"
               + (f" {torch.cuda.get_device_name()}" if dev == "cuda" else ""), arch=args.arch, batch=args.batch,
               classes=args.classes, threads=torch.get_num_threads())

    # (e) text encoder: EOT truncation
    tokens = clip_model.tokenize([f"a photo of a {n}." for n in names]).to(dev)
    emb = clip.token_embeddings(tokens)
    with torch.no_grad(), tb.autocast(dev):
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
        with torch.no_grad(), tb.autocast(dev):
            clip.encode_image(images)

    def image_forward_backward():
        with tb.autocast(dev):
            clip.encode_image(images, visual_prompt).float().sum().backward()

    def text_forward_backward():
        with tb.autocast(dev):
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
    for name in args.learners.split(","):
        teacher = prompts.PromptSRC(clip).to(dev) if name == "promptkd" else None
        learner = prompts.build_learner(name, clip, teacher).to(dev).train()
        opt = torch.optim.SGD(prompts.trainable_parameters(learner).values(), lr=1e-3, momentum=0.9)

        def step():
            with tb.autocast(dev):
                loss = learner.training_loss(images, labels, names)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        t = timed(step, r, dev)
        out[name] = dict(step_s=t, step_over_floor=t / floors[name], step_over_text_floor=t / floors["text"],
                         images_per_s=args.batch / t)

    # (c), (d): DPC step at b = 4, K = 8 vs a CoOp backbone step on 32 images
    b, k = 4, min(8, args.classes)
    coop_images = torch.randn(32, 3, size, size, device=dev)
    coop_labels = torch.arange(32, device=dev) % args.classes
    opt = torch.optim.SGD([coop.ctx], lr=1e-3, momentum=0.9)

    def coop_step(x, y):
        with tb.autocast(dev):
            loss = coop.training_loss(x, y, names)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    tuned = {n: t.detach().clone() for n, t in prompts.prompt_tensors(coop).items()}
    mixed = {n: torch.nn.Parameter(t.clone()) for n, t in tuned.items()}
    dpc_opt = torch.optim.SGD(mixed.values(), lr=1e-3, momentum=0.9)
    # the negative pool: decoded PIL images of a typical photo size, as train_dpc.py keeps them
    folder = data.make_synthetic_imagefolder(tempfile.mkdtemp(), "pool", n_classes=args.classes, n_train=4, n_val=0,
                                             n_test=1, size=args.photo_size)
    pool = tb.train_set(data.read_splits(os.path.dirname(folder), "pool")["train"], size)
    sampler = NoisySampler([item.label for item in pool.items], args.classes, k, 0)
    threads = ThreadPoolExecutor(args.workers) if args.workers > 0 else None
    with torch.no_grad(), tb.autocast(dev):
        tuned_text = F.normalize(coop.encode_text(names).float(), dim=-1)
    sampler_time, pairs = [0.0], []

    def dpc_step():  # train_dpc.py's own step, then its backward and SGD step
        step = train_dpc.dpc_step(coop, coop_images[:b], coop_labels[:b].cpu(), sampler, pool, threads, tuned,
                                  tuned_text, mixed, names, 0.2, 100.0, dev)
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
    for x, y, _ in itertools.islice(tb.make_loader(pool, args.batch, True, args.workers, drop_last=True), 12):
        t0 = time.perf_counter()
        waits.append(t0 - t_last)
        coop_step(x.to(dev), y.to(dev))
        if dev == "cuda":
            torch.cuda.synchronize()
        t_last = time.perf_counter()
        steps.append(t_last - t0)
    out["data_wait"] = dict(share=sum(waits[1:]) / (sum(waits[1:]) + sum(steps[1:])), steps=len(steps) - 1,  # 1st: start-up
                            batch=args.batch, workers=args.workers, photo_size=args.photo_size)
    # (a) evaluation through train_backbone.accuracy (decode + transform + loader) vs raw encode_image
    folder = data.make_synthetic_imagefolder(tempfile.mkdtemp(), "bench", n_classes=10, n_train=1, n_val=0,
                                             n_test=args.eval_images // 10, size=size)
    items = data.read_splits(os.path.dirname(folder), "bench")["test"]
    raw_images = torch.randn(100, 3, size, size, device=dev)

    def raw():
        with torch.no_grad(), tb.autocast(dev):
            for _ in range(len(items) // 100):
                clip.encode_image(raw_images)

    t_raw = timed(raw, 1, dev)
    t_eval = timed(lambda: tb.accuracy(coop, items, data.classnames_of(items), dev, args.workers), 1, dev)
    out["eval"] = dict(images=len(items), raw_images_per_s=len(items) / t_raw, eval_images_per_s=len(items) / t_eval,
                       eval_over_raw_throughput=t_raw / t_eval, workers=args.workers)

    out["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda"
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
              f"({floors[name]:.3f} s), {o['step_over_text_floor']:.2f} x the text-side floor")
    d = out["dpc"]
    print(f"DPC step (b=4, K={k}, mean L {d['mean_pairs_L']:.1f}) = {d['dpc_over_coop32']:.2f} x CoOp step on 32 images; sampler share "
          f"{100 * d['sampler_share']:.1f}%")
    w = out["data_wait"]
    print(f"data wait: {100 * w['share']:.1f}% of CoOp steps at batch {args.batch} ({w['workers']} workers, "
          f"{w['photo_size']} px photos, {w['steps']} steps)")
    print(f"peak memory {out['peak_memory_mb']:.0f} MB")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
