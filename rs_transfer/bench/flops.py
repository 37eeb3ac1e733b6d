"""Parameters and GFLOPs. GFLOPs are the paper's: 2 x the multiply-adds fvcore counts (RS-50@160 = 4.6)."""

import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    # fvcore 0.1.5 (its last release) scripts a focal loss at import time; torch >= 2.10 deprecates jit.script.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis


def count_gflops(model: nn.Module, resolution: int, in_chans: int = 3) -> float:
    """Forward GFLOPs of one image at `resolution` (model in eval mode, on CPU)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, torch.zeros(1, in_chans, resolution, resolution))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        macs = analysis.total()
    model.train(was_training)
    return 2 * macs / 1e9


def params_and_gflops(specs) -> list:
    """One `{"model", "resolution", "params_m", "gflops"}` per spec; consecutive specs of one model share it."""
    from rs_transfer.bench.specs import build_model

    rows, name, model = [], None, None
    for spec in specs:
        if spec.name != name:
            model = None  # one model alive at a time: rs420 is 0.8 GB
            name, model = spec.name, build_model(spec.name)
        rows.append({
            "model": spec.name,
            "resolution": spec.resolution,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "gflops": round(count_gflops(model, spec.resolution), 3),
        })
    return rows


def format_flops(rows) -> str:
    lines = [f"{'model':<22}{'params M':>10}{'GFLOPs':>10}"]
    for row in rows:
        spec = f"{row['model']}@{row['resolution']}"
        lines.append(f"{spec:<22}{row['params_m']:>10.2f}{row['gflops']:>10.2f}")
    return "\n".join(lines)
