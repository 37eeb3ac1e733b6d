"""Networks only: `from rs_transfer.models import create_model` needs nothing from the training code.

The name grammar (`parse_name`, `ModelSpec`, `LAYOUTS`) comes from zoo.py and needs no torch; `create_model` is
imported from resnet_rs.py (torch and timm, ~3 s) on first use, so `rs-transfer info BADNAME` answers at once.
"""

from rs_transfer.models.zoo import LAYOUTS, ModelSpec, parse_name

__all__ = ["LAYOUTS", "ModelSpec", "create_model", "parse_name"]


def __getattr__(name: str):
    if name == "create_model":
        from rs_transfer.models.resnet_rs import create_model

        return create_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
