"""What a benchmark measures: `NAME@RES` specs, and the network each name builds.

A name is a zoo name first (rs50, rs101-w1.5, resnet152) and otherwise any timm architecture (the paper's
EfficientNet rows are timm's `efficientnet_b0` ... `efficientnet_b7`), always without pretrained weights:
speed and FLOPs do not depend on the weights, and nothing is downloaded.
"""

from dataclasses import dataclass

from torch import nn

from rs_transfer.errors import UserError


@dataclass(frozen=True)
class BenchSpec:
    name: str
    resolution: int

    def __str__(self) -> str:
        return f"{self.name}@{self.resolution}"


def parse_spec(text: str) -> BenchSpec:
    name, sep, res = text.strip().partition("@")
    if not sep or not name or not res.isdigit() or int(res) <= 0:
        raise UserError(f"bad model spec {text!r}: expected NAME@RES, e.g. rs50@160 or efficientnet_b1@240")
    return BenchSpec(name, int(res))


def parse_specs(texts) -> list:
    """Specs from CLI values; each value may hold several comma-separated specs."""
    specs = [parse_spec(part) for text in texts for part in text.split(",") if part.strip()]
    if not specs:
        raise UserError("no model specs given: expected NAME@RES[,NAME@RES...], e.g. rs50@160,efficientnet_b1@240")
    return specs


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialised network for a name a model family owns (models/registry.py) or a timm architecture
    name."""
    import timm

    from rs_transfer.models import family_of

    try:
        family = family_of(name)
    except UserError:
        family = None
    if family is not None:
        # timm's init for the zoo: the official truncated-normal init takes ~17 s for RS-50 on CPU and changes no
        # timing. An EfficientNet is the very network pretraining builds for an EfficientNet-RS point.
        arch = {"init": "timm"} if family.name == "resnet_rs" else {}
        return family.load().build(name, num_classes=num_classes, **arch)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise UserError(
        f"unknown model {name!r}: expected a zoo name (rs<depth>[-w<mult>], resnet<depth>[-w<mult>][-se][-d]) "
        f"or a timm architecture such as efficientnet_b0 ... efficientnet_b7"
    )
