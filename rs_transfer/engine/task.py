"""What a task hands the engine. The engine never branches on which task it runs.

A task is a dataset, a model whose forward turns a batch into losses, and an evaluator:

    task = Task(model=SegmentationModel(...), train_set=SegmentationSet(...), evaluate=make_evaluator(...),
                primary_metric="miou")                       # downstream/segmentation.py builds exactly this
    final_metrics = engine.trainer.train(config, task)

- `model.forward(batch)` in train mode returns a dict with "loss" (a scalar tensor to minimise) and optionally
  other scalar tensors, which are logged. `batch` is what `collate_fn` returns, moved to the device by the engine
  (tensors anywhere inside lists, tuples and dicts are moved).
- `model(batch)` in eval mode returns the task's predictions, and evaluators call nothing else (never a sub-module):
  classification (pretrain, cifar100, video: engine/classification.py's Classifier): logits (N, classes);
  segmentation (pascal_seg, ade_seg): logits (N, classes, H, W); depth (nyu_depth): depth in metres (N, H, W);
  detection (pascal_det): torchvision's detections, one dict per image (boxes XYXY in input pixels, labels, scores).
- `model.net` is the network to export: its state dict has our zoo's key names (a `create_model` classifier, the
  3D ResNet3d, the dense tasks' DensePredictor), so a wrapper keeps its loss outside it (and normalisation, where
  the network is a zoo classifier: a DensePredictor normalises inside, its Normalize has no state). At the
  end of every run the engine writes OUTPUT_DIR/weights.pth (rank 0, atomically): `model.net`'s state dict, from
  the EMA copy when the run uses EMA; `models.weights.load_weights` loads it strictly into the same network (e.g.
  `create_model(name, num_classes=..., weights=".../weights.pth")`). A model without `net` (detection, whose
  network is the whole model) is exported as it is. Checkpoints (checkpoint.py) hold the whole model.
- `evaluate(model)` is called on every rank with the model to evaluate (the EMA copy when EMA is on, unwrapped
  from DDP, in eval mode) and returns a dict of metrics as Python floats, identical on every rank (the evaluator
  reduces across ranks itself; `rs_transfer.engine.distributed` has the helpers). Fractions in [0, 1].
- `primary_metric` names the metric that picks the best checkpoint (higher is better).
- `family`, `name` and `sample_unit` label the run (its family and task, what a training sample is); the family sets
  them (rs_transfer/families.py `build`), the engine writes them to summary.json and its logs.
- `report(model)`, when set, is the evaluator `train.report_best` reports the best checkpoint with (pretraining
  that picks it on minival reports it on val); same contract as `evaluate`, same metric names.
- an `evaluate` or `report` with a `close()` method (TopKEvaluator, which keeps its loader workers between
  evaluations) is closed by the trainer when the run ends or fails.
- `visualize(model)`, when set, is called on the main rank after every evaluation with the same model (eval mode,
  no grad, the run's autocast) and returns {name: uint8 (3, H, W)}, pictures of a few fixed validation images
  (rs_transfer/predictor.py `visualizer`: the overlays, boxes or coloured depth `predict` draws), logged to
  TensorBoard as predictions/<name> at the evaluation's step.
- `train_set` is a map-style Dataset (indexable, with a length): the engine shards it over ranks, shuffles it per
  epoch and resumes mid-epoch by index. Random augmentations may use torch, numpy or `random`: the engine makes
  them reproducible and resumable (docs/engine.md).
- The engine calls `model.train()` before training and after every evaluation; a layer that must stay frozen
  (e.g. a frozen BN) should be a module without a training mode, such as torchvision's FrozenBatchNorm2d.
- `make_loader(keys, batch_size, device)`, when set, replaces the engine's DataLoader (e.g. a DALI pipeline): it
  returns an iterable of batches of `batch_size` samples, in the order of `keys`, a sequence of (epoch, index)
  that the engine fills in before each iteration (its length and start change on resume); the batch loader must
  read key i on demand, never hold them all. Samples keep their augmentation per key, as the engine's loader does.
- `evaluate` runs under `torch.no_grad()` and the run's autocast (`train.amp`; bf16 or fp16 on GPU by default): cast
  outputs with `.float()` before accumulating statistics.
- The backbone (for `model.freeze_stages`, `model.freeze_bn`, `train.backbone_lr_mult`, `train.layer_decay`) is found
  by one rule, `find_backbone`, not declared per task: the first module, in `model.named_modules()` order, with
  children named `layer1`..`layer4`, the names timm's ResNet gives C2..C5 and every network of the zoo keeps (the
  classifier, `features_only` inside BackboneFPN for the dense tasks and Faster R-CNN, the 3D ResNet3d). Its stem
  is every child registered before `layer1` (conv1, bn1, act1, maxpool); children after `layer4` (global_pool, fc)
  and everything outside it (FPN, heads) are the heads. A classification network is therefore backbone but its
  classifier. A model without such a module has no backbone, and those keys are refused for it (ConfigError).
"""

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn
from torch.utils.data import Dataset


STAGES = ("layer1", "layer2", "layer3", "layer4")  # C2..C5


@dataclass
class Backbone:
    """A model's backbone (`find_backbone`): `module` and its `path` in the model ("" for the model itself);
    `stages` the child names of each of its 5 stages, detectron2's order: the stem, then C2..C5."""

    module: nn.Module
    path: str
    stages: list[list[str]]

    def stage_modules(self) -> list[list[tuple[str, nn.Module]]]:
        """Each stage as (child name, child module) pairs."""
        return [[(name, getattr(self.module, name)) for name in names] for names in self.stages]


def find_backbone(model: nn.Module) -> Optional[Backbone]:
    """The backbone of `model` by the rule in this module's docstring, or None when it has none."""
    for path, module in model.named_modules():
        children = [name for name, _ in module.named_children()]
        if all(stage in children for stage in STAGES):
            stem = children[:children.index(STAGES[0])]
            return Backbone(module, path, [stem] + [[stage] for stage in STAGES])
    return None


def exported_network(model: nn.Module) -> nn.Module:
    """The network of a task's model that weights.pth holds: `model.net`, or the model itself without one."""
    return getattr(model, "net", model)


@dataclass
class Task:
    model: nn.Module
    train_set: Dataset
    evaluate: Callable[[nn.Module], dict]
    primary_metric: str
    collate_fn: Optional[Callable] = None
    make_loader: Optional[Callable] = None  # (keys, batch_size, device) -> iterable of batches; None: DataLoader
    report: Optional[Callable[[nn.Module], dict]] = None  # evaluates best.pt under train.report_best; None: evaluate
    visualize: Optional[Callable[[nn.Module], dict]] = None  # model -> {name: uint8 (3, H, W)} for TensorBoard
    # Labels the family gives its run (rs_transfer/families.py `build`): written to summary.json, and what one
    # training sample is for the throughput figures ("images", "clips"). The engine only reports them.
    family: Optional[str] = None
    name: Optional[str] = None
    sample_unit: str = "images"
