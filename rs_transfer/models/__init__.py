"""Networks only: `from rs_transfer.models import create_model` needs nothing from the training code.

Importing this package imports no torch: the name grammar (`parse_name`, `ModelSpec`, `LAYOUTS`) comes from zoo.py
and the families from families.py, so a bad name is answered at once; `create_model` imports its family's module
(torch, timm: ~3 s) when called.
"""

from rs_transfer.errors import UserError
from rs_transfer.models.registry import FAMILIES, ModelFamily, family_of, register
from rs_transfer.models.zoo import LAYOUTS, ModelSpec, parse_name

__all__ = ["FAMILIES", "LAYOUTS", "ModelFamily", "ModelSpec", "check_weights", "create_model", "family_of",
           "parse_name", "register"]


def check_weights(weights: str | None) -> None:
    """Check a weights file or `timm:` name torch-free, before a job imports torch (~5-30 s) or writes anything.
    Raises WeightsError for a `timm:` name not in the cache (hub.resolve), a missing file, or a file that is neither
    a PyTorch checkpoint nor safetensors (files.check_file). None (no weights) passes."""
    from rs_transfer.files import check_file
    from rs_transfer.models import hub

    if weights:
        check_file(hub.resolve(weights))


def create_model(name: str, num_classes: int = 1000, weights: str | None = None, features_only: bool = False,
                 out_indices: tuple = (1, 2, 3, 4), **arch_overrides):
    """Build a network by name (its family from models/registry.py), optionally load weights, optionally return
    the feature extractor.

    Args:
        name: a name some family owns: the zoo grammar (models/zoo.py) `rs152` (SE + ResNet-D), `resnet200`,
            `resnet50-se-d`, `rs26-w0.25` (width multiplier), `rs-transfer models` lists the paper's; timm's
            `efficientnet_b0` ... `efficientnet_b7` (models/efficientnet.py, Section 7.2's EfficientNet-RS), whose
            only switches are drop_rate and drop_path_rate.
        num_classes: classifier outputs; 0 builds no classifier (the forward gives pooled features).
        weights: a weights file or a timm name `timm:NAME.TAG`, loaded strictly into the classifier
            (models/weights.py); a classifier of another size is dropped and the model keeps its new head.
        features_only: the family's feature extractor of the classifier (`features`; the zoo's: [C2, C3, C4, C5]
            at strides 4, 8, 16, 32 with the default out_indices, timm's FeatureListNet).
        **arch_overrides: the family's switches (the zoo's: `resnet_rs.build_resnet`'s drop_rate, drop_path_rate,
            drop_path_schedule, bn_momentum, zero_init_last, init).
    Returns: an nn.Module taking float images (N, 3, H, W) normalised with the ImageNet mean/std
        (models/normalize.py) and returning logits (N, num_classes); any H, W (global pooling). With
        features_only, a list of (N, C_i, H / s_i, W / s_i).
    Raises: UserError for a name no family owns, a bad override value, or features_only of a family without
        `features`; WeightsError for weights that are missing, unreadable, not cached (timm names) or do not fit.
    Source: timm's `resnetrs*` (timm/models/resnet.py) and the official TF ResNet-RS (PAPER.md sections 2 and 7).
    """
    from rs_transfer.models.weights import load_weights

    family = family_of(name)
    module = family.load()
    if features_only and not hasattr(module, "features"):
        raise UserError(f"{name}: features_only needs the family's feature extractor (`features`), which the "
                        f"{family.label} family does not have: it cannot be a detection or dense backbone")
    model = module.build(name, num_classes=num_classes, **arch_overrides)
    if weights is not None:
        load_weights(model, weights)
    return module.features(model, out_indices) if features_only else model
