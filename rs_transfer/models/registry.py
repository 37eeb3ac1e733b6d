"""Model families by name, importable without torch: the one table `create_model` reads to build a network from a
name a user typed, and that `rs-transfer` checks a name against before torch is loaded.

A family is one module that defines `build(name, num_classes, **arch) -> nn.Module` (a classifier: normalised
float images (N, 3, H, W) -> logits (N, num_classes); num_classes 0: pooled features) and, if it can serve as a
dense or detection backbone, `features(model, out_indices) -> nn.Module` (the feature extractor of that classifier,
whose forward gives a list of feature maps and whose `feature_info` describes them: timm's FeatureListNet). It is
registered by one `ModelFamily` line in FAMILIES (or `register(family)` from outside the package: a test, a
notebook). The family's name pattern decides which names it owns, so finding the family imports nothing.

Source: timm's model registry (timm/models/_registry.py, `register_model`), which maps names to builders; ours
maps a grammar (rs<depth>[-w<mult>]) rather than a list, so each family declares a pattern.
"""

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Optional

from rs_transfer.errors import UserError
from rs_transfer.models.zoo import parse_name


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the family's short name ("resnet_rs")
    label: str  # what tables and plots call it ("ResNet-RS", "EfficientNet")
    module: str  # the module defining build() (and features() for backbones)
    pattern: str  # a regular expression every name of the family matches in full (lower case)
    grammar: str  # the names, as an error message shows them ("efficientnet_b0 ... efficientnet_b7")
    # check(name) -> None, torch-free: a name the pattern matches but the family cannot build raises UserError.
    check: Optional[Callable] = None

    def owns(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name.strip().lower()) is not None

    def load(self):
        """The family's module (imports torch)."""
        return importlib.import_module(self.module)


FAMILIES = [
    ModelFamily("resnet_rs", "ResNet-RS", "rs_transfer.models.resnet_rs", r"(rs|resnet)\d+(-\S*)?",
                "rs<depth>[-w<mult>] or resnet<depth>[-w<mult>][-se][-d], e.g. rs50, rs101-w1.5, resnet152-w2",
                check=parse_name),
    # Section 7.2's EfficientNet-RS points train timm's EfficientNets.
    ModelFamily("efficientnet", "EfficientNet", "rs_transfer.models.efficientnet", r"efficientnet_b[0-7]",
                "efficientnet_b0 ... efficientnet_b7"),
]


def register(family: ModelFamily) -> None:
    """Add a model family for this Python process (a test, a notebook); a name it owns that an earlier family owns
    too stays the earlier family's."""
    FAMILIES.append(family)


def family_of(name: str) -> ModelFamily:
    """The family that owns model name `name`, its name checked (torch-free). Raises UserError for a name no family
    owns (listing every family's names) or one its family cannot build (e.g. rs51: the depth is not in the zoo)."""
    for family in FAMILIES:
        if family.owns(name):
            if family.check is not None:
                family.check(name)
            return family
    raise UserError(f"unknown model name {name!r}: expected " + "; or ".join(f.grammar for f in FAMILIES))
