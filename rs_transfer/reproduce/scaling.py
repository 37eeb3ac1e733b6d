"""The paper's scaling study as a tool (Section 6, Appendix E, Section 7.2): `rs-transfer scale plan | run`.

`plan` turns a grid (depths x widths x resolutions x epoch regimes; defaults = the paper's) into one pretraining
config per point, each with the paper's regularisation for that point (`regularisation`, Appendix E), and writes
STUDY/plan.json beside STUDY/configs/<point>.yaml. `run` trains the points (all of them in order, or one with
`--point I`, e.g. a cluster array job), into STUDY/runs/<point>: a point whose folder holds final_metrics.json is
skipped, an unfinished one resumes from its newest checkpoint. `report` and `suggest` (scaling_report.py) read
the finished points.

EfficientNet-RS (Section 7.2): EfficientNet B0-B7 at reduced resolutions with the paper's RandAugment rule are
planned points too (`--efficientnet`); their configs train timm's `efficientnet_bN` (models.create_model) on the
same recipe, with the original EfficientNets' dropout, drop-connect and weight decay.
"""

import json
import re
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from rs_transfer.config import ConfigError, find_config, load_config, packaged_configs, read_yaml, string_override
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_write_json, atomic_write_text, make_dir
from rs_transfer.models import family_of
from rs_transfer.models.zoo import LAYOUTS

log = logging.getLogger(__name__)

REGIMES = (10, 100, 350)  # the paper's epoch regimes (Figure 3)
# Runs longer than this get the 350-epoch regularisation (overfitting can occur); shorter ones flips and crops
# only, as the paper's 10- and 100-epoch runs. Other epoch counts are not the paper's: this is our boundary.
SHORT_REGIME_MAX_EPOCHS = 100
WEIGHT_DECAY = 4e-5  # every regime (Appendix E)
LABEL_SMOOTHING = 0.1  # 350 epochs only
RANDAUGMENT_LAYERS = 2
DROPOUT_BY_WIDTH = {0.25: 0.0, 0.5: 0.1, 1.0: 0.25, 1.5: 0.6, 2.0: 0.75}  # 350 epochs (Appendix E)
STOCHASTIC_DEPTH = 0.2  # 350 epochs, resolution >= 224, width > 0.25 (Appendix E)

# EfficientNet-RS: the original resolutions (Table 7's EfficientNet rows) and the original EfficientNets' other
# hyper-parameters, which Section 7.2 keeps ("all other hyperparameters are kept the same"): head dropout per
# model (EfficientNet paper / timm defaults), drop-connect 0.2, label smoothing 0.1, weight decay 1e-5.
EFFICIENTNET_RESOLUTION = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}
EFFICIENTNET_DROPOUT = {"b0": 0.2, "b1": 0.2, "b2": 0.3, "b3": 0.3, "b4": 0.4, "b5": 0.4, "b6": 0.5, "b7": 0.5}
EFFICIENTNET_DROP_CONNECT = 0.2
EFFICIENTNET_WEIGHT_DECAY = 1e-5

PLAN_FILE = "plan.json"
IMAGENET_TRAIN = 1_281_167  # ImageNet-1k's training images, the scaling study's dataset


@dataclass(frozen=True)
class Point:
    """One grid point. The field order is the `scale plan --json` interface (plus `config`)."""

    model: str  # zoo name rs<depth>-w<width>, or timm's efficientnet_bN
    depth: int | None  # None for EfficientNet
    width: float | None
    resolution: int  # train = eval resolution, pixels
    epochs: int
    dropout: float  # before the classifier
    randaugment_magnitude: float | None  # None: no RandAugment (flips and crops only)
    stochastic_depth: float
    label_smoothing: float
    weight_decay: float

    @property
    def key(self) -> str:
        """The point's config and run folder name, e.g. rs50-w0.25_i128_e350."""
        return f"{self.model}_i{self.resolution}_e{self.epochs}"

    @property
    def family(self) -> str:
        return rs_family(self.model)


def rs_family(model: str) -> str:
    """The family of a model trained with the RS recipe, as the scaling study names it: "ResNet-RS",
    "EfficientNet-RS" (Section 7.2), from its family's label (models/registry.py)."""
    label = family_of(model).label
    return label if label.endswith("-RS") else f"{label}-RS"


def randaugment_magnitude(width: float, resolution: int) -> int:
    """Appendix E, 350 epochs: 10 for widths 0.25-0.5 or resolutions up to 160, 15 for 224-320, 20 above.
    Resolutions 161-223 (not in the paper's grid) take 15, the next rule up."""
    if width <= 0.5 or resolution <= 160:
        return 10
    return 15 if resolution <= 320 else 20


def regularisation(width: float, resolution: int, epochs: int) -> dict:
    """The paper's regularisation of a ResNet grid point (Appendix E, PAPER.md section 3).

    Returns {"dropout", "randaugment_magnitude" (None: no RandAugment), "stochastic_depth", "label_smoothing",
    "weight_decay"}. Runs of up to SHORT_REGIME_MAX_EPOCHS epochs (the paper's 10 and 100) get flips and crops
    only; longer ones the 350-epoch rules. Raises UserError for a long-regime width outside the dropout table.
    """
    if epochs <= SHORT_REGIME_MAX_EPOCHS:
        return {"dropout": 0.0, "randaugment_magnitude": None, "stochastic_depth": 0.0, "label_smoothing": 0.0,
                "weight_decay": WEIGHT_DECAY}
    if width not in DROPOUT_BY_WIDTH:
        raise UserError(f"width {width:g} at {epochs} epochs: the paper's dropout is given for widths "
                        f"{', '.join(f'{w:g}' for w in DROPOUT_BY_WIDTH)} only")
    return {
        "dropout": DROPOUT_BY_WIDTH[width],
        "randaugment_magnitude": randaugment_magnitude(width, resolution),
        "stochastic_depth": STOCHASTIC_DEPTH if resolution >= 224 and width > 0.25 else 0.0,
        "label_smoothing": LABEL_SMOOTHING,
        "weight_decay": WEIGHT_DECAY,
    }


def efficientnet_randaugment_magnitude(resolution: int) -> int:
    """Section 7.2: 10 for resolution 224 or smaller, 20 above 320, 15 otherwise."""
    if resolution <= 224:
        return 10
    return 20 if resolution > 320 else 15


def resnet_points(depths, widths, resolutions, epochs) -> list:
    """Every depth x width x resolution x epochs point, in that nesting order. Raises UserError for a depth with no
    layout (models/zoo.py LAYOUTS) or a bad value."""
    unknown = [d for d in depths if d not in LAYOUTS]
    if unknown:
        raise UserError(f"--depths {','.join(map(str, unknown))}: no layout; depths: {sorted(LAYOUTS)}")
    _check_positive(widths, "--widths")
    _check_positive(resolutions, "--resolutions")
    _check_positive(epochs, "--epochs")
    return [Point(model=f"rs{d}-w{w:g}", depth=d, width=w, resolution=r, epochs=e, **regularisation(w, r, e))
            for e in epochs for d in depths for w in widths for r in resolutions]


def efficientnet_points(variants, resolutions, epochs) -> list:
    """EfficientNet-RS: each variant (b0..b7) at each of `resolutions` below its original resolution (Section 7.2:
    reduced resolutions, width and depth unchanged), RandAugment by `efficientnet_randaugment_magnitude`."""
    unknown = [v for v in variants if v not in EFFICIENTNET_RESOLUTION]
    if unknown:
        raise UserError(f"--efficientnet {','.join(unknown)}: expected some of {','.join(EFFICIENTNET_RESOLUTION)}")
    return [Point(model=f"efficientnet_{v}", depth=None, width=None, resolution=r, epochs=e,
                  dropout=EFFICIENTNET_DROPOUT[v], randaugment_magnitude=efficientnet_randaugment_magnitude(r),
                  stochastic_depth=EFFICIENTNET_DROP_CONNECT, label_smoothing=LABEL_SMOOTHING,
                  weight_decay=EFFICIENTNET_WEIGHT_DECAY)
            for e in epochs for v in variants for r in resolutions if r < EFFICIENTNET_RESOLUTION[v]]


def _check_positive(values, option: str) -> None:
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{option} must list positive numbers, got {','.join(map(str, values)) or 'nothing'}")


def parse_list(text: str | None, kind, option: str, default) -> list:
    """`--depths 50,200,50` -> [50, 200] (a repeated value counts once, first order kept); None -> default.
    Raises UserError naming the option."""
    if text is None:
        return list(default)
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None
    return list(dict.fromkeys(values))


def _base_reference(base: str) -> str:
    """How a written config names its base: a packaged name stays a name (found from any folder and install),
    a user's file becomes an absolute path."""
    path = find_config(base)
    try:
        return path.resolve().relative_to(packaged_configs().resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def point_config(point: Point, base: str, run_dir: Path) -> dict:
    """The YAML mapping of one point: its base, model, resolution, epochs and regularisation."""
    magnitude = point.randaugment_magnitude
    model = {"name": point.model, "drop_rate": point.dropout, "drop_path_rate": point.stochastic_depth}
    if point.family == "EfficientNet-RS":
        # The RS recipe's bn_momentum 1.0 is a ResNet switch (create_model refuses it for an EfficientNet):
        # back to the default, timm's own BatchNorm.
        model["bn_momentum"] = 0.1
    return {
        "base": base,
        "output_dir": str(run_dir),
        "model": model,
        "data": {"image_size": point.resolution},
        "augment": {"randaugment": "none" if magnitude is None else "tf", "num_layers": RANDAUGMENT_LAYERS,
                    "magnitude": 0 if magnitude is None else magnitude},
        "train": {"epochs": point.epochs, "label_smoothing": point.label_smoothing,
                  "weight_decay": point.weight_decay},
    }


def _with_overrides(mapping: dict, overrides: list) -> dict:
    """`key=value` overrides (dotted keys, YAML values) written into a config mapping; load_config checks them."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"bad override {item!r}: expected key=value, e.g. train.batch_size=64")
        *parents, leaf = key.strip().split(".")
        node = mapping
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[leaf] = read_yaml(value, f"override {item!r}")  # bounded like load_config's: no bomb, no tag
    return mapping


def plan(study: str | Path | None, depths, widths, resolutions, epochs, efficientnet=(), base: str = "scaling/base.yaml",
         overrides: list = (), dry_run: bool = False) -> list:
    """Plan a study: one dict per point (`Point` fields + "config": the written config's path, or None with
    `dry_run`). Writes STUDY/configs/<key>.yaml (each checked with load_config) and STUDY/plan.json unless
    `dry_run`. `overrides` are written into every config (e.g. train.batch_size=1024).

    A study that already has a plan is extended, never replaced, so its finished runs stay in `report`: its points
    keep their place, config and run folder (a point key already planned is the same point: not rewritten, not
    added twice; one planned without a config by an older rs-transfer gets one), and the new grid's other points
    are appended. Returns every point of the resulting plan, in plan order (the `--point` index).

    Raises UserError for bad grid values, ConfigError naming `--base` or the override as typed for a base or
    override the pretraining schema rejects; both before anything is written (and with `dry_run` too).
    """
    points = resnet_points(depths, widths, resolutions, epochs) + efficientnet_points(efficientnet, resolutions, epochs)
    base_ref = _check_base_and_overrides(base, list(overrides))
    if dry_run or study is None:
        return [{**asdict(p), "config": None} for p in points]
    study = Path(study).resolve()
    existing = {point_key(p): p for p in load_plan(study)} if (study / PLAN_FILE).is_file() else {}
    kept = {key: row for key, row in existing.items() if row["config"] is not None}
    texts = {}  # key -> (point, config text) of the points to write
    for point in points:
        if point.key in kept or point.key in texts:
            continue
        mapping = _with_overrides(point_config(point, base_ref, study / "runs" / point.key), list(overrides))
        rule = "Appendix E" if point.family == "ResNet-RS" else "Section 7.2"
        texts[point.key] = (point, f"# rs-transfer scale plan: {point.model} at {point.resolution} px, "
                            f"{point.epochs} epochs, {rule} regularisation\n" + yaml.safe_dump(mapping, sort_keys=False))
    _check_configs({key: text for key, (_, text) in texts.items()})  # a bad point fails before any file is written
    make_dir(study / "configs", "scaling study's config folder")
    rows = dict(existing)  # insertion order: the existing plan's points first, in their order
    for key, (point, text) in texts.items():
        config_path = atomic_write_text(study / "configs" / f"{key}.yaml", text)
        rows[key] = {**asdict(point), "config": str(config_path)}
    atomic_write_json(study / PLAN_FILE, {"base": base_ref, "overrides": list(overrides), "points": list(rows.values())})
    finished = sum(is_finished(study, row) for row in kept.values())
    log.info("planned %d new points in %s%s", len(texts), study,
             f"; kept the {len(kept)} points of its existing plan ({finished} finished)" if kept else "")
    return list(rows.values())


def _check_base_and_overrides(base: str, overrides: list) -> str:
    """The configs' `base:` reference (`_base_reference`), after checking `base` alone and then with `overrides`
    against the pretraining schema. Raises ConfigError naming `--base BASE` or the override as typed."""
    from rs_transfer.pretrain.config import PretrainConfig

    try:
        base_ref = _base_reference(base)
        load_config(PretrainConfig, base)
    except ConfigError as error:
        raise ConfigError(f"--base {base}: {error}") from None
    load_config(PretrainConfig, base, overrides)  # its ConfigError names the override 'key=value' as typed
    _with_overrides({}, overrides)  # the key=value syntax the configs are written with
    return base_ref


def _check_configs(texts: dict) -> None:
    """load_config every point's config text (key -> YAML) from a scratch folder, so that a point the schema
    rejects leaves no file in the study. Raises ConfigError naming the point."""
    from rs_transfer.pretrain.config import PretrainConfig

    with tempfile.TemporaryDirectory(prefix="rs-transfer-plan-") as scratch:
        for key, text in texts.items():
            path = Path(scratch) / f"{key}.yaml"
            atomic_write_text(path, text)
            try:
                load_config(PretrainConfig, path)
            except ConfigError as error:
                raise ConfigError(f"point {key}: {error}") from None


# What each point of plan.json must hold: the Point fields (and "config") with their JSON types.
POINT_TYPES = {"model": (str,), "depth": (int, type(None)), "width": (int, float, type(None)), "resolution": (int,),
               "epochs": (int,), "dropout": (int, float), "randaugment_magnitude": (int, float, type(None)),
               "stochastic_depth": (int, float), "label_smoothing": (int, float), "weight_decay": (int, float),
               "config": (str, type(None))}


def load_plan(study: str | Path) -> list:
    """The points of STUDY/plan.json, each checked to hold every Point field (and "config") with its type, so
    `run` and `report` never meet a hand-edited or truncated plan halfway. Raises UserError naming the file (and the
    point and field) when it is missing or not a plan."""
    path = Path(study) / PLAN_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; write it with `rs-transfer scale plan --out {study}`") from None
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a scale plan ({' '.join(str(error).split()) or type(error).__name__})") from None
    points = document.get("points") if isinstance(document, dict) else None
    if not isinstance(points, list):
        raise UserError(f"{path}: not a scale plan (expected an object whose \"points\" is a list, as `rs-transfer "
                        "scale plan` writes)")
    for index, point in enumerate(points):
        if not isinstance(point, dict):
            raise UserError(f"{path}: point {index} is a JSON {type(point).__name__}, not an object")
        for field_name, types in POINT_TYPES.items():
            value = point.get(field_name)
            if field_name not in point or not isinstance(value, types) or isinstance(value, bool):
                raise UserError(f"{path}: point {index} has {field_name} = {value!r}: expected "
                                f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}; "
                                "plan the study again with `rs-transfer scale plan`")
        # the model names the point's run folder (point_key): a name like ../x would train outside the study
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", point["model"]) or point["resolution"] < 1 \
                or point["epochs"] < 1:
            raise UserError(f"{path}: point {index} ({point['model']!r} at {point['resolution']} px, {point['epochs']} "
                            "epochs) is not a point a plan writes: plan the study again with `rs-transfer scale plan`")
    return points


def point_key(point: dict) -> str:
    return f"{point['model']}_i{point['resolution']}_e{point['epochs']}"


def run_dir(study: str | Path, point: dict) -> Path:
    return Path(study).resolve() / "runs" / point_key(point)


def is_finished(study, point: dict) -> bool:
    return (run_dir(study, point) / "final_metrics.json").is_file()


def synthetic_root(study: str | Path) -> Path:
    """STUDY/synthetic_data: a generated 4-class folder dataset (written once), for demos and tests."""
    from rs_transfer.engine.write_once import write_once
    from rs_transfer.pretrain.synthetic import make_folder_dataset

    return write_once(Path(study).resolve() / "synthetic_data",
                      lambda folder: make_folder_dataset(folder, num_classes=4, train_per_class=64, val_per_class=16))


def run(study: str | Path, point: int | None = None, overrides: list = (), synthetic: bool = False,
        train=None) -> list:
    """Train the study's unfinished points in plan order (or only point `point`, 0-based); returns the keys
    trained. Finished points (final_metrics.json) are skipped; an unfinished one resumes (train.resume=auto).
    `overrides` pass through to every run (e.g. data.root=DIR); `synthetic` uses STUDY/synthetic_data.
    `train(config, overrides)` defaults to pretrain.run.pretrain. Raises UserError for a point index outside
    the plan or a point without a config (a plan written before EfficientNet-RS points trained: plan again)."""
    if train is None:
        from rs_transfer.pretrain.run import pretrain as train
    points = load_plan(study)
    if point is not None:
        if not 0 <= point < len(points):
            raise UserError(f"--point {point}: the plan in {study} has points 0-{len(points) - 1}")
        if points[point]["config"] is None:
            raise UserError(f"--point {point} ({point_key(points[point])}) has no config in {study}/{PLAN_FILE}: "
                            "an older rs-transfer planned it; run `rs-transfer scale plan` again")
        selected = [points[point]]
    else:
        selected = [p for p in points if p["config"] is not None]
        skipped = len(points) - len(selected)
        if skipped:
            log.warning("%d points of %s have no config (planned by an older rs-transfer): run `rs-transfer scale "
                        "plan` again to train them", skipped, study)
    extra = [string_override("data.root", synthetic_root(study))] if synthetic else []
    trained = []
    for p in selected:
        key = point_key(p)
        if is_finished(study, p):
            log.info("%s: finished, skipped", key)
            continue
        log.info("training %s into %s", key, run_dir(study, p))
        train(p["config"], [*extra, *overrides, string_override("output_dir", run_dir(study, p)), "train.resume=auto"])
        trained.append(key)
    return trained


def format_plan(points: list, study: str, dry_run: bool) -> str:
    """`scale plan`'s table: one line per point (its model, resolution, epochs and regularisation, its config),
    the training cost in ImageNet images, and the command that trains them."""
    lines = [f"{'#':>4}  {'model':<18}{'res':>5}{'epochs':>7}{'dropout':>8}{'RA':>5}{'SD':>6}{'LS':>6}  config"]
    for i, p in enumerate(points):
        magnitude = "-" if p["randaugment_magnitude"] is None else f"{p['randaugment_magnitude']:g}"
        lines.append(f"{i:>4}  {p['model']:<18}{p['resolution']:>5}{p['epochs']:>7}{p['dropout']:>8g}"
                     f"{magnitude:>5}{p['stochastic_depth']:>6g}{p['label_smoothing']:>6g}  {p['config'] or '-'}")
    epochs = sum(p["epochs"] for p in points)
    by_regime = ", ".join(f"{sum(p['epochs'] == e for p in points)} x {e}" for e in sorted({p["epochs"] for p in points}))
    lines.append(f"\n{len(points)} points ({by_regime} epochs): {epochs:,} epochs in all, "
                 f"{epochs * IMAGENET_TRAIN:,.3g} training images at ImageNet's {IMAGENET_TRAIN:,} per epoch")
    if dry_run:
        lines.append("dry run: nothing written")
    else:
        lines.append(f"train them with `rs-transfer scale run --study {study} data.root=DIR` "
                     "(or one per job: --point I)")
    return "\n".join(lines)
