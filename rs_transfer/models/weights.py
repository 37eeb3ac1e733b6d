"""Load checkpoints into zoo models, offline and strictly: the project's one file reader (`read_file`) and one
strict loader (`load_strict`); everything that reads or loads weights goes through them.

Reads timm checkpoint files (.pth/.pt/.bin with `weights_only=True`, or .safetensors; by path, or by timm's name
`timm:NAME.TAG` from the local Hugging Face cache, models/hub.py), timm's train.py
checkpoints (`state_dict` / `state_dict_ema`, beside its `args`), our own training checkpoints (`model` / `ema`),
our runs' `weights.pth` (the exported network, written by the engine at the end of every run: plain zoo keys),
and the key prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add. Our task wrappers hold the network as
`net` (engine/task.py), so a `final.pt` or `checkpoints/*.pt` of ours has every key under `net.`: that prefix is
stripped too, for those files and for weights exported by hand before the engine wrote `weights.pth`, but only when
every key has it (a network that merely has a module named `net` keeps its names). A checkpoint never runs code.
Every key, shape and kind of number must line up; the one deliberate exception is the classifier: a classifier of
another size (or none, for a feature extractor) is dropped, the model keeps its freshly initialised head, and a log
line says so.
"""

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from rs_transfer.errors import UserError, WeightsError, one_line  # WeightsError: imported from here by older code
from rs_transfer.files import check_file, zip_damage
from rs_transfer.models import hub

log = logging.getLogger(__name__)

EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
PLAIN_KEYS = ("state_dict", "model")
CLASSIFIER_PREFIX = "fc."  # our ResNets' (timm's ResNet); other timm models name theirs in pretrained_cfg
# DDP / DataParallel and torch.compile wrappers; either may wrap the other, so they are stripped in any order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The attribute our task wrappers keep the network under (engine/task.py's contract).
TASK_WRAPPER_PREFIX = "net."
# timm's train.py stores its parsed command line (`args`, an argparse.Namespace) in every checkpoint; timm's own
# loader allows this one plain data class under weights_only=True, and so do we. Nothing else is allowed.
SAFE_GLOBALS = [argparse.Namespace]


def read_file(path: str | Path, what: str = "weights file", error: type[UserError] = WeightsError) -> dict:
    """The dict in a .pt/.pth/.bin (`torch.load(weights_only=True)`) or .safetensors file, on the CPU.

    A torch.save zip is checked against the CRC-32 it stores for every record first (torch.load does not check them):
    any bit flipped since it was written is an error, not different weights. Legacy pickle files and safetensors
    carry no checksum.

    Raises `error` (one line: f"{what} not found: PATH", f"cannot read {what} PATH: why", f"{what} PATH is corrupted:
    its record RECORD fails its CRC-32 check" (files.zip_damage), or f"{what} PATH holds a TYPE, not a dict") for a missing, unreadable or
    corrupted file, one that would need code to run, or one without a dict; see `check_file`.
    """
    path = Path(path)
    kind = check_file(path, what, error)
    if kind == "zip":  # every torch.save file since PyTorch 1.6: ours, timm's, torchvision's
        try:
            damage = zip_damage(path)
        except OSError as problem:
            raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
        if damage is not None:
            raise error(f"{what} {path} is corrupted: {damage} (bytes changed on disk or in a copy since torch.save "
                        "wrote it); use another copy")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as problem:  # a corrupt or foreign file: say which, and why (torch's text is coloured, multi-line)
        raise error(f"cannot read {what} {path}: {type(problem).__name__}: {one_line(problem)}") from None
    if not isinstance(checkpoint, dict):
        raise error(f"{what} {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def read_state_dict(path: str | Path, prefer_ema: bool = True) -> dict:
    """The tensor dict inside a checkpoint file, unwrapped and without `module.` / `_orig_mod.` prefixes, nor the
    `net.` prefix of our task wrappers when every key has it (wrapper prefixes may sit on either side of it:
    `module.net.conv1.weight` and `net._orig_mod.conv1.weight` both become `conv1.weight`).

    path: a file, or a timm weight name `timm:NAME.TAG` found in the local Hugging Face cache (models/hub.py).
    prefer_ema: take the EMA weights when the file has both (the RS recipe evaluates the EMA).
    Raises WeightsError (one line naming the file or the name) when the file is missing, unreadable, would need
    code to run, or holds something other than tensors (see `read_file`), or a name is not in the cache.
    """
    path = hub.resolve(path)
    checkpoint = read_file(path)
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
        state_dict[strip_wrappers(key)] = value
    if state_dict and all(key.startswith(TASK_WRAPPER_PREFIX) for key in state_dict):
        state_dict = {strip_wrappers(key.removeprefix(TASK_WRAPPER_PREFIX)): v for key, v in state_dict.items()}
    return state_dict


def strip_wrappers(key: str) -> str:
    """`key` without the leading prefixes of WRAPPER_PREFIXES, e.g. `module._orig_mod.conv1.weight` -> `conv1.weight`."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]  # each wrapper prefix is one name and a dot
    return key


def check_fit(path: str | Path, state_dict: dict, own: dict, what: str = "the model", hint: str = "") -> None:
    """Raise WeightsError naming the missing and unexpected keys, shape conflicts and dtype conflicts of
    `state_dict` (from file `path`) against `own` (the model's state dict).

    A dtype conflict is an integer or bool tensor where the model holds floating point: `load_state_dict` would cast
    it silently (a safetensors file of int64 weights loads as whole numbers). float16/bfloat16 weights are fine.
    """
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shared = [k for k in own if k in state_dict]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in shared
        if own[k].shape != state_dict[k].shape
    ]
    wrong_kind = [
        f"{k}: file {state_dict[k].dtype} vs model {own[k].dtype}"
        for k in shared
        if own[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or mismatched or wrong_kind:
        raise WeightsError(
            # the hint first: the key lists that follow can run to hundreds of characters
            f"weights file {path} does not fit {what}{hint}: " + _describe(missing, unexpected, mismatched, wrong_kind)
        )


def load_strict(module: nn.Module, state_dict: dict, path: str | Path, what: str = "the model", hint: str = "",
                keep: frozenset = frozenset()) -> nn.Module:
    """Load `state_dict` (read from file `path`) into `module`: every key, shape and kind of number must fit.

    keep: keys of `module` that the file may lack on purpose (a new classifier): they keep their current values.
    Raises WeightsError naming the file and every key, shape or dtype that does not fit (see `check_fit`).
    """
    own = {k: v for k, v in module.state_dict().items() if k not in keep}
    check_fit(path, state_dict, own, what=what, hint=hint)
    # Every key was checked above; only `keep` leaves module keys that the file lacks.
    module.load_state_dict(state_dict, strict=not keep)
    return module


def classifier_prefix(model: nn.Module) -> str:
    """The state-dict prefix of `model`'s classifier: "fc." for our ResNets, the name timm's pretrained_cfg gives
    for other timm models (EfficientNet's "classifier.")."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return f"{config.get('classifier', 'fc')}." if isinstance(config, dict) else CLASSIFIER_PREFIX


def load_weights(model: nn.Module, path: str | Path, prefer_ema: bool = True, new_classifier: bool = True,
                 what: str = "the model", hint: str = "") -> nn.Module:
    """Load the weights file `path` into `model` strictly (`load_strict`).

    new_classifier: a classifier (`fc.*`, or what `classifier_prefix` names) in the file that does not fit the model's (another size, or a model
    without one) is dropped on purpose, and a file without one (a feature extractor's) leaves the model's head as it
    is: either way the model keeps its freshly initialised head (fine-tuning); False: the classifier must fit too.
    Raises WeightsError naming the file and every key, shape or dtype that does not fit (see `check_fit`)."""
    state_dict = read_state_dict(path, prefer_ema=prefer_ema)
    own = model.state_dict()
    prefix = classifier_prefix(model)
    classifier = {k for k in state_dict if k.startswith(prefix)}
    own_classifier = frozenset(k for k in own if k.startswith(prefix))
    keep = frozenset()
    if new_classifier and classifier and (
        not own_classifier or any(k not in own or own[k].shape != state_dict[k].shape for k in classifier)
    ):
        shape = tuple(state_dict.get(f"{prefix}weight", torch.empty(0)).shape)
        log.info("%s: classifier %s dropped; the model keeps its own freshly initialised head", path, shape)
        state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
        keep = own_classifier
    elif new_classifier and not classifier and own_classifier:
        log.info("%s has no classifier (a feature extractor's weights); the model keeps its own head", path)
        keep = own_classifier
    return load_strict(model, state_dict, path, what=what, hint=hint, keep=keep)


def _describe(missing, unexpected, mismatched, wrong_kind, show: int = 5) -> str:
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape conflicts", mismatched),
                        ("dtype conflicts", wrong_kind)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
    return "; ".join(parts)
