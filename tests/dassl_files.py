"""Stage-1 folders as the original Dassl code writes them, for the import and safe-loading tests.

Dassl's `save_checkpoint` writes {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} with
torch.save. CoOp registers its prompt learner alone (`prompt_learner/`: ctx + token buffers); MaPLe,
PromptSRC and PromptKD register the whole CustomCLIP (frozen CLIP copies included). The scheduler is
Dassl's ConstantWarmupScheduler, whose state_dict() holds its successor CosineAnnealingLR object, and
with it the SGD optimiser object over every parameter of the model: a realistic checkpoint pickles
torch.optim classes, not only tensors.
"""
import os

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

import prompts

FOLDER = {"coop": "prompt_learner", "maple": "MultiModalPromptLearner", "promptsrc": "VLPromptLearner",
          "promptkd": "VLPromptLearner"}


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
    """Our learner's tensors under the original code's names (README Differences 11), fp16 where the
    original holds fp16, plus the frozen copies a whole-model checkpoint carries."""
    out = {}
    for key, value in prompts.learner_state(learner).items():
        parts = key.split(".")
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
        out[key] = value.half() if value.is_floating_point() else value
    prefix = "" if name == "coop" else "prompt_learner."
    out[prefix + "token_prefix"] = torch.zeros(3, 1, 8).half()
    out[prefix + "token_suffix"] = torch.zeros(3, 72, 8).half()
    if name != "coop":  # the whole model: frozen CLIP towers, logit scale, PromptSRC's zero-shot encoder
        clip = learner.clip
        out.update({f"image_encoder.{k}": v.half() for k, v in clip.visual.state_dict().items()})
        out.update({f"text_encoder.transformer.{k}": v.half() for k, v in clip.transformer.state_dict().items()})
        out["text_encoder.positional_embedding"] = clip.positional_embedding.detach().clone()
        out["logit_scale"] = clip.logit_scale.detach().clone()
        if name == "promptsrc":
            out["prompt_learner.ZS_image_encoder.conv1.weight"] = clip.visual.conv1.weight.detach().half()
    return out


def save_dassl_checkpoint(path: str, state_dict: dict, epoch: int = 20, payload=None) -> None:
    """torch.save as Dassl's save_checkpoint does, with a real SGD + warm-up/cosine scheduler over the
    model's parameters (stepped once, so the optimiser state holds momentum buffers). `payload`, if
    given, is stored in the state dict too (the hostile-file tests)."""
    params = [torch.nn.Parameter(v.float()) for v in state_dict.values() if v.is_floating_point()][:4]
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
    """<run_dir>/<Dassl folder>/model.pth.tar-<epoch> (or model-best.pth.tar, as PromptKD's teachers)."""
    file = "model-best.pth.tar" if best else f"model.pth.tar-{epoch}"
    path = os.path.join(run_dir, FOLDER[name], file)
    save_dassl_checkpoint(path, dassl_state_dict(name, learner), epoch, payload)
    return path
