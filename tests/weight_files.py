"""What the weight-loading tests share (test_weights.py: what loads and how; test_weights_refused.py: what is
refused and how it is said): a seeded tiny zoo model, output and state-dict comparisons, a pickle that would run
code, and a Hugging Face cache folder built offline."""

from pathlib import Path

import torch

from rs_transfer.models import create_model

NAME = "rs26-w0.25"


def seeded_model(seed: int = 0, num_classes: int = 1000):
    """`NAME` with timm's random init (no zero-init last BN, so every block changes the output), in eval mode."""
    torch.manual_seed(seed)
    return create_model(NAME, num_classes=num_classes, init="timm", zero_init_last=False).eval()


def same_output(a, b, x=None) -> bool:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) if x is None else x
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()


class Payload:
    """Unpickling this calls print: a file holding it must be refused without running it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def hf_cache(root: Path, repo_id: str, filename: str, state_dict: dict, revision: str = "0123abcd") -> Path:
    """The Hugging Face hub cache layout: models--ORG--NAME/refs/main holds the revision, the file is under
    snapshots/REVISION/ (huggingface_hub's file_download.py)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, str(snapshot / filename))
    else:
        torch.save(state_dict, snapshot / filename)
    return snapshot / filename
