"""Networks only: `from rs_transfer.models import create_model` needs nothing from the training code."""

from rs_transfer.models.resnet_rs import LAYOUTS, ModelSpec, create_model, parse_name

__all__ = ["LAYOUTS", "ModelSpec", "create_model", "parse_name"]
