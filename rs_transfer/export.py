"""Export a trained network for inference: ONNX, TorchScript or a `torch.export` program (.pt2), each checked
against PyTorch on random inputs before it is reported written.

ONNX goes through `torch.onnx.export(dynamo=True)` (needs the `export` extra: onnx, onnxscript, onnxruntime) with a
dynamic batch dimension and is run back with onnxruntime; TorchScript is `torch.jit.trace` (deprecated by PyTorch
in favour of `torch.export`, kept because deployments still load it); pt2 is `torch.export.export` +
`torch.export.save`, loadable with `torch.export.load(path).module()`.
"""

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rs_transfer.errors import UserError, one_line
from rs_transfer.files import atomic_open, make_dir

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
# fp32 on CPU: ONNX Runtime fuses and reorders convolutions; the largest difference seen on rs26-w0.25 logits is
# ~1e-5. The bound leaves two orders of magnitude for deeper nets without hiding a wrong graph (those differ by O(1)).
ATOL, RTOL = 1e-3, 1e-3


class ExportError(UserError):
    pass


@dataclass
class Exported:
    path: Path
    format: str
    max_abs_diff: float  # largest |exported - PyTorch| over the check inputs


def export_module(module: nn.Module, example: torch.Tensor, fmt: str, out: str | Path) -> Exported:
    """Write `module` (in eval mode, on the CPU) to `out` in format `fmt` and check it.

    example: an input (N, ...) of the shape and dtype the exported model takes, N >= 2 (torch.export specialises a
    dimension of size 1 to a constant); the batch dimension stays dynamic
    for onnx and pt2 (the check runs batch N and N + 1), TorchScript traces it. Returns the path and the largest
    absolute output difference. Raises ExportError for an unknown format, a missing `export` extra, a module that
    does not export (the exporter's first line), or outputs outside ATOL + RTOL x |PyTorch|; the file is
    written atomically (a failed export leaves no file at `out`; a full disk is one FileWriteError naming it, and no
    temp file is left).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    make_dir(out.parent, "export folder")
    module = module.eval().cpu()
    # Serialised in memory and run back from those bytes; only a checked file reaches the disk, through a Python
    # write (files.atomic_open): the exporters' C++ file writers abort the process on a full disk (exit -6) and
    # leave their half-written file behind.
    data, run = _WRITERS[fmt](module, example)
    checks = [example, torch.cat([example, example[:1]])] if fmt != "torchscript" else [example]
    worst = 0.0
    with torch.no_grad():
        for inputs in checks:
            expected, got = module(inputs), run(inputs)
            worst = max(worst, _compare(expected, got, fmt))
    with atomic_open(out, "wb") as file:  # a full disk: one FileWriteError naming `out`, no temp file left
        file.write(data)
    log.info("wrote %s (%s); largest difference to PyTorch %.2e", out, fmt, worst)
    return Exported(out, fmt, worst)


def _compare(expected, got, fmt: str) -> float:
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    worst = 0.0
    for want, have in zip(expected, got, strict=True):
        have = torch.as_tensor(have)
        if have.shape != want.shape:
            raise ExportError(f"{fmt} export gives shape {tuple(have.shape)}, PyTorch {tuple(want.shape)}")
        diff = (have.float() - want.float()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        if not torch.all(diff <= ATOL + RTOL * want.float().abs()):
            raise ExportError(f"{fmt} export differs from PyTorch by up to {float(diff.max()):.3g} "
                              f"(allowed {ATOL} + {RTOL} x |output|): not written")
    return worst


def _onnx(module, example) -> tuple[bytes, Callable]:
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"ONNX export needs the export extra (pip install 'rs-transfer[export]'): {error}") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    # One self-contained model (the weights inside): ONNX's protobuf limit is 2 GB and the largest zoo network,
    # RS-420, is ~0.8 GB in fp32.
    try:
        # The exporter prints ~20 lines of progress ("[torch.onnx] Run decompositions...", the optimiser's) to
        # stdout, where `rs-transfer export` prints its one JSON result: kept, and shown only at debug level.
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                        dynamic_shapes=({0: batch},), verbose=False)
            data = program.model_proto.SerializeToString()
    except ImportError as error:  # onnx / onnxscript
        raise ExportError(f"ONNX export needs the export extra (pip install 'rs-transfer[export]'): {error}") from None
    except Exception as error:
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {one_line(error)}") from None
    finally:
        log.debug("torch.onnx.export said:\n%s", chatter.getvalue())
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(inputs):
        return [torch.from_numpy(output) for output in session.run(None, {name: inputs.numpy()})]

    return data, run


def _torchscript(module, example) -> tuple[bytes, Callable]:
    with warnings.catch_warnings():  # "torch.jit is deprecated": said once, in the module docstring and the docs
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(module, example)
        except Exception as error:
            raise ExportError(f"TorchScript trace failed: {type(error).__name__}: {one_line(error)}") from None
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        data = buffer.getvalue()
        return data, torch.jit.load(io.BytesIO(data))


def _pt2(module, example) -> tuple[bytes, Callable]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:
        raise ExportError(f"torch.export failed: {type(error).__name__}: {one_line(error)}") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    return data, torch.export.load(io.BytesIO(data)).module()


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2}


class ImagesToOutputs(nn.Module):
    """A task model's eval forward (engine/task.py: `model({"image": images})` -> predictions) as images -> outputs,
    the form exporters take. images: uint8 (N, 3, H, W), or clips (N, 3, T, H, W) for video, as the loaders ship."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model({"image": images})


class DetectorFeatures(nn.Module):
    """A detection task's (pascal_det, coco_det) backbone + FPN (P3-P7): images already resized and normalised by
    torchvision's GeneralizedRCNNTransform, float (N, 3, H, W) -> a tuple of 5 feature maps (N, C, H / s, W / s),
    s = 8 ... 128. The whole Faster R-CNN is not exported: torch.export (and so the dynamo ONNX exporter) stops at
    torchvision's batched_nms, whose shapes depend on the data ("Could not guard on data-dependent expression
    4*u1 > 4000", torch 2.14, torchvision 0.29)."""

    def __init__(self, detector):
        super().__init__()
        self.body = detector.detector.backbone

    def forward(self, images: torch.Tensor):
        return tuple(self.body(images).values())


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, resolution: int | None = None) -> Exported:
    """Export the network of a finished run (rs_transfer/runs.py load_run: its config and weights.pth, EMA weights
    when the run used EMA) for inference.

    What is exported: classification (pretrain, cifar100, folder_cls, video) and dense tasks (pascal_seg, ade_seg, nyu_depth):
    the whole task model at evaluation, uint8 images (N, 3, R, R) (video: clips (N, 3, T, R, R)) -> logits (N,
    classes), segmentation logits (N, classes, R, R) or depth in metres (N, R, R), normalisation included;
    detection (pascal_det, coco_det: detection.py's Detector): backbone + FPN only (DetectorFeatures). R: `resolution`,
    else the run's evaluation size. The batch dimension is dynamic (onnx, pt2). out: a file, or an existing folder
    (OUT/model.<ext>); default RUN_DIR/export/model.{onnx,ts,pt2}; checked before exporting.
    Raises RunError for an unusable run folder, ExportError as export_module does.
    """
    from rs_transfer.downstream.detection import Detector
    from rs_transfer.runs import load_run

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if resolution is not None and resolution < 1:
        raise ExportError(f"--resolution must be >= 1, got {resolution}")
    out = export_path(run_dir, fmt, out)  # checked before the (slow) export, not after
    run = load_run(run_dir, device="cpu")
    config = run.config
    size = resolution if resolution is not None else _eval_size(run)
    if isinstance(run.model, Detector):
        module = DetectorFeatures(run.model)
        example = torch.rand(2, 3, size, size)
    elif run.family == "video":
        module = ImagesToOutputs(run.model)
        example = torch.randint(0, 256, (2, 3, config.data.clip_frames, size, size), dtype=torch.uint8)
    else:
        module = ImagesToOutputs(run.model)
        example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    return export_module(module, example, fmt, out)


def export_path(run_dir, fmt: str, out) -> Path:
    """The file an export writes: `out` when it is a file path, OUT/model.<ext> when `out` is an existing folder or
    ends with a slash (a folder to make), RUN_DIR/export/model.<ext> when None. Raises ExportError naming --out when
    its parent is a file."""
    name = f"model{FORMATS[fmt]}"
    if out is None:
        return Path(run_dir) / "export" / name
    folder = str(out).endswith(("/", os.sep))
    out = Path(out)
    if out.is_dir() or folder:
        return out / name
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"--out {out}: {out.parent} is a file, not a folder")
    return out


def _eval_size(run) -> int:
    """The run's evaluation size, for a run exported without --resolution: what its family declares
    (families.TaskDeclaration.eval_size). Raises ExportError, asking for --resolution, for a run whose config says
    none (a task or family of another package)."""
    from rs_transfer.families import declaration

    size = declaration(run.family, run.task).eval_size(run.config)
    if size is None:
        name = f"{run.family}/{run.task}" if run.task else run.family
        raise ExportError(f"{name}: its config has no evaluation size (task.image_size, task.crop_size): give the "
                          "input's height and width with --resolution")
    return size
