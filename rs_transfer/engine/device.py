"""Putting a model and its batches on the device: the one batch-to-device, the channels-last memory format, the
device a model lives on, and the precision it computes in (`train.amp` resolved once, by `resolve_amp`). The trainer,
every evaluator and pseudo-labelling use these.
"""

import torch
from torch import nn

from rs_transfer.errors import UserError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters, which an evaluator moves its batches to."""
    return next(model.parameters()).device


def to_channels_last(model: nn.Module) -> None:
    """Channels-last weights: 4-D (2-D convs) as channels_last, 5-D (3-D convs) as channels_last_3d."""
    for module in model.modules():
        dims = {p.ndim for p in module.parameters(recurse=False)}
        if dims == {4} or dims == {4, 1}:
            module.to(memory_format=torch.channels_last)
        elif dims == {5} or dims == {5, 1}:
            module.to(memory_format=torch.channels_last_3d)


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Tensors anywhere in lists, tuples (named ones included) and dicts moved to `device`; with `channels_last`,
    images (4-D/5-D float or uint8) made channels-last (a model's Normalize keeps that format for the float
    images it makes). Anything else is returned as it is."""
    if torch.is_tensor(batch):
        batch = batch.to(device, non_blocking=True)
        if channels_last and (batch.is_floating_point() or batch.dtype == torch.uint8) and batch.ndim in (4, 5):
            batch = batch.contiguous(
                memory_format=torch.channels_last if batch.ndim == 4 else torch.channels_last_3d)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, channels_last) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def resolve_device(name: str | None) -> torch.device:
    """The device a command-line `--device` names: None or "auto" (CUDA when available, else the CPU), "cpu",
    "cuda" or "cuda:N". Raises UserError for another name, or for CUDA where none is available."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """`train.amp` ("auto", "bf16", "fp16" or "none") on `device`: (the precision used, "bf16", "fp16" or "none"; why,
    for the run's start line).

    `auto` is bf16 on a GPU that computes it natively (compute capability >= 8.0, or ROCm), fp16 on an older GPU
    (where bf16 is only emulated, and slow), and none on the CPU, where bf16 autocast was measured about 4x slower
    than float32 (docs/engine.md). `torch.cuda.is_bf16_supported()` counts emulation as support unless told not to.
    """
    if amp != "auto":
        return amp, f"train.amp={amp}"
    if device.type != "cuda":
        return "none", f"auto: float32 on {device.type}, where autocast is slower"
    with torch.cuda.device(device):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return ("bf16", "auto: this GPU has bf16") if native else ("fp16", "auto: this GPU has no native bf16")


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (`resolve_amp`); "none" is a disabled one (float32)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision), enabled=precision != "none")
