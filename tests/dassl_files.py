"""Stage-1 folders as the original Dassl code writes them, for the import and safe-loading tests.

Dassl's `save_checkpoint` writes {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} with
torch.save. CoOp registers its prompt learner alone (`prompt_learner/`: ctx + token buffers); MaPLe,
PromptSRC and PromptKD register the whole CustomCLIP (frozen CLIP copies included). The scheduler is
Dassl's ConstantWarmupScheduler, whose state_dict() holds its successor CosineAnnealingLR object, and
with it the SGD optimiser object over every parameter of the model: a realistic checkpoint pickles
torch.optim classes, not only tensors. DePT (Koorye/DePT trainers/elp_coop.py, elp_maple.py) registers
the whole model too, CoOp + DePT as `PromptLearner/`, with its CAT head beside the learner's tensors.
"""
import os

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

import prompts

FOLDER = {"coop": "prompt_learner", "maple": "MultiModalPromptLearner", "promptsrc": "VLPromptLearner",
          "promptkd": "VLPromptLearner"}
DEPT_FOLDER = {"coop": "PromptLearner", "maple": "MultiModalPromptLearner"}


class ConstantWarmupScheduler(LRScheduler):
    """Dassl's dassl/optim/lr_scheduler.py: one warm-up epoch at a constant lr, then `successor`."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def dassl_state_dict(name: str, learner) -> dict:
    """Our learner's tensors under the original code's names (docs/differences.md #11), fp16 where the
    original holds fp16 (MaPLe's deep prompts and their projections stay fp32), plus the frozen copies a
    whole-model checkpoint carries."""
    out = {}
    for key, value in prompts.learner_state(learner).items():
        parts = key.split(".")
        fp32 = name == "maple" and parts[0] in ("compound_prompts_text", "compound_prompt_projections")
        if name == "coop":
            pass                                    # the prompt learner alone: "ctx"
        elif name == "maple":
            key = "prompt_learner." + key            # ctx, proj, compound_prompts_text, compound_prompt_projections
        elif key == "ctx":
            key = "prompt_learner.ctx"
        elif key == "visual_prompt":
            key = "image_encoder.VPT"
        elif parts[0] in ("visual_deep", "text_deep"):
            tower = "image_encoder" if parts[0] == "visual_deep" else "text_encoder"
            key = f"{tower}.transformer.resblocks.{int(parts[1]) + 1}.VPT_shallow"
        elif parts[0] == "projector":
            key = f"VPT_image_trans.conv1.{parts[1]}.{parts[2]}"
            if parts[1] in ("0", "3") and parts[2] == "weight":
                value = value[:, :, None, None]
        out[key] = value.half() if value.is_floating_point() and not fp32 else value
    prefix = "" if name == "coop" else "prompt_learner."
    out[prefix + "token_prefix"] = torch.zeros(3, 1, 8).half()
    out[prefix + "token_suffix"] = torch.zeros(3, 72, 8).half()
    if name != "coop":  # the whole model: frozen CLIP towers, logit scale, PromptSRC's zero-shot encoder
        out.update(clip_copies(learner.clip))
        if name == "promptsrc":
            out["prompt_learner.ZS_image_encoder.conv1.weight"] = learner.clip.visual.conv1.weight.detach().half()
    return out


def clip_copies(clip) -> dict:
    """The frozen CLIP as a whole-model checkpoint carries it: towers in fp16, positions and logit scale fp32."""
    out = {f"image_encoder.{k}": v.half() for k, v in clip.visual.state_dict().items()}
    out.update({f"text_encoder.transformer.{k}": v.half() for k, v in clip.transformer.state_dict().items()})
    out["text_encoder.positional_embedding"] = clip.positional_embedding.detach().clone()
    out["logit_scale"] = clip.logit_scale.detach().clone()
    return out


def dassl_dept_state_dict(name: str, dept) -> dict:
    """DePT's whole CustomCLIP (CoOp or MaPLe + DePT): the learner's model, CoOp's prompt learner under
    `prompt_learner.` with the CLIP copies beside it, then the CAT head: FiLM γ, β in fp32 and the linear
    head in fp16, as an fp16 run of the original code holds them."""
    out = dassl_state_dict(name, dept.learner)
    if name == "coop":
        out = dict({f"prompt_learner.{k}": v for k, v in out.items()}, **clip_copies(dept.clip))
    for theirs, film in (("film_lp_img", dept.film_image), ("film_lp_text", dept.film_text)):
        out.update({f"{theirs}.scale": film.scale.detach().clone(), f"{theirs}.bias": film.bias.detach().clone()})
    out["linear_probe_proj.weight"] = dept.linear_head.weight.detach().half()
    out["linear_probe_proj.bias"] = dept.linear_head.bias.detach().half()
    return out


def save_dassl_checkpoint(path: str, state_dict: dict, epoch: int = 20, payload=None) -> None:
    """torch.save as Dassl's save_checkpoint does, with a real SGD + warm-up/cosine scheduler over the
    model's parameters (stepped once, so the optimiser state holds momentum buffers). `payload`, if
    given, is stored in the state dict too (the hostile-file tests)."""
    # copies: stepping them must not move the saved tensors (an fp32 one's .float() is the tensor itself)
    params = [torch.nn.Parameter(v.float().clone()) for v in state_dict.values() if v.is_floating_point()][:4]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    scheduler = ConstantWarmupScheduler(optimizer, CosineAnnealingLR(optimizer, 20), 1, 1e-5)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    state = dict(state_dict, **({"payload": payload} if payload is not None else {}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": 71.5}, path)


def write_dassl_folder(run_dir: str, name: str, learner, epoch: int = 20, best: bool = False, payload=None) -> str:
    """<run_dir>/<Dassl folder>/model.pth.tar-<epoch> (or model-best.pth.tar, as PromptKD's teachers), and
    the text file `checkpoint` naming it. A prompts.DePT learner is written as DePT writes it."""
    file = "model-best.pth.tar" if best else f"model.pth.tar-{epoch}"
    if isinstance(learner, prompts.DePT):
        path, state = os.path.join(run_dir, DEPT_FOLDER[name], file), dassl_dept_state_dict(name, learner)
    else:
        path, state = os.path.join(run_dir, FOLDER[name], file), dassl_state_dict(name, learner)
    save_dassl_checkpoint(path, state, epoch, payload)
    with open(os.path.join(os.path.dirname(path), "checkpoint"), "w") as f:
        f.write(file + "\n")
    return path
