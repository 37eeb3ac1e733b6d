"""Load checkpoints into zoo models, offline and strictly.

Reads timm checkpoint files (.pth/.pt/.bin with `weights_only=True`, or .safetensors), timm training checkpoints
(`state_dict` / `state_dict_ema`), our own training checkpoints (`model` / `ema`), and DDP `module.` prefixes.
A checkpoint never runs code. Every key and shape must line up; the one deliberate exception is the classifier:
a classifier of another size (or none, for a feature extractor) is dropped, the model keeps its freshly
initialised head, and a log line says so.
"""

import logging
from pathlib import Path

import torch
from torch import nn

from rs_transfer.errors import UserError

log = logging.getLogger(__name__)

EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
PLAIN_KEYS = ("state_dict", "model")
CLASSIFIER_PREFIX = "fc."


class WeightsError(UserError):
    pass


def read_state_dict(path: str | Path, prefer_ema: bool = True) -> dict:
    """The tensor dict inside a checkpoint file, unwrapped and without `module.` prefixes.

    prefer_ema: take the EMA weights when the file has both (the RS recipe evaluates the EMA).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say which, and why, in one line
        raise WeightsError(f"cannot read weights file {path}: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"weights file {path} holds a {type(checkpoint).__name__}, not a state dict")
    order = EMA_KEYS + PLAIN_KEYS if prefer_ema else PLAIN_KEYS + EMA_KEYS
    for key in order:
        if isinstance(checkpoint.get(key), dict) and checkpoint[key]:
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"weights file {path}: entry {key!r} is not a tensor; expected a state dict or a checkpoint "
                f"with one of {list(EMA_KEYS + PLAIN_KEYS)}"
            )
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def load_weights(model: nn.Module, path: str | Path, prefer_ema: bool = True) -> nn.Module:
    """Load `path` into `model` strictly, except for a classifier that does not fit (dropped on purpose)."""
    state_dict = read_state_dict(path, prefer_ema=prefer_ema)
    own = model.state_dict()
    classifier = {k for k in state_dict if k.startswith(CLASSIFIER_PREFIX)}
    own_classifier = {k for k in own if k.startswith(CLASSIFIER_PREFIX)}
    dropped = False
    if classifier and (
        not own_classifier or any(k not in own or own[k].shape != state_dict[k].shape for k in classifier)
    ):
        shape = tuple(state_dict.get("fc.weight", torch.empty(0)).shape)
        log.info("%s: classifier %s dropped; the model keeps its own freshly initialised head", path, shape)
        state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
        own = {k: v for k, v in own.items() if k not in own_classifier}
        dropped = True
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(f"weights file {path} does not fit the model: " + _describe(missing, unexpected, mismatched))
    # Every other key was checked above; only a dropped classifier leaves the model keys the file lacks.
    model.load_state_dict(state_dict, strict=not dropped)
    return model


def _describe(missing, unexpected, mismatched, show: int = 5) -> str:
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape conflicts", mismatched)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)
