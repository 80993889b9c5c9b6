"""Precision: what the towers compute in on a device, and the fp16 loss scaler (docs/differences.md #1, #16).

fp32 on the CPU; bf16 autocast on GPUs with bf16 tensor cores; fp16 autocast with loss scaling on older
GPUs. Both stages call autocast() and grad_scaler() from here, so they always agree. Imports only torch.
"""

import torch


def compute_dtype(device: str) -> torch.dtype:
    """What the towers compute in on `device` (docs/differences.md #1 and 16): fp32 on the CPU; bf16 on GPUs
    with bf16 tensor cores (compute capability 8.0 on: A100, H100, RTX 30xx and later); fp16 on older ones
    (V100, T4). Decided on the capability of the GPU asked for, not on torch.cuda.is_bf16_supported(), which
    by default also says yes where bf16 is only emulated (slower than fp16 there)."""
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(torch.device(device)) >= (8, 0) else torch.float16


def autocast(device: str):
    """Autocast in compute_dtype(device) on a GPU; plain fp32 on the CPU."""
    if not device.startswith("cuda"):
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=compute_dtype(device))


def grad_scaler(device: str):
    """Loss scaling for fp16 autocast (GPUs without bf16 tensor cores: V100, T4), where small gradients
    underflow; a no-op for bf16 and fp32. Both stages use it, and checkpoint its state (docs/differences.md #16)."""
    return torch.amp.GradScaler("cuda" if device.startswith("cuda") else "cpu",
                                enabled=compute_dtype(device) == torch.float16)


def to_device(tensors, device: str):
    """A dict of tensors restored from a checkpoint (read on the CPU) on the run's device, or None as it is:
    what a resumed loop adds to its own tensors must sit where they do (PromptSRC's GPA sum)."""
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}
