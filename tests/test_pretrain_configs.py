from dataclasses import asdict
import re

import pytest

from engine_toy import CONFIGS as ALL_CONFIGS
from rs_transfer.config import ConfigError, load_config
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.reproduce.table1 import TABLE1

CONFIGS = ALL_CONFIGS / "pretrain"

# PAPER.md section 3, Table 8: (model, resolution, RandAugment magnitude, stochastic depth, dropout).
TABLE8 = [
    ("rs50", 160, 10, 0.0, 0.25),
    ("rs101", 160, 10, 0.0, 0.25),
    ("rs101", 192, 15, 0.0, 0.25),
    ("rs152", 192, 15, 0.0, 0.25),
    ("rs152", 224, 15, 0.0, 0.25),
    ("rs152", 256, 15, 0.0, 0.25),
    ("rs200", 256, 15, 0.1, 0.25),
    ("rs270", 256, 15, 0.1, 0.25),
    ("rs350", 256, 15, 0.1, 0.25),
    ("rs350", 320, 15, 0.1, 0.4),
    ("rs420", 320, 15, 0.1, 0.4),
]


def _flat(config) -> dict:
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = value

    walk("", asdict(config))
    return out


@pytest.mark.parametrize("model,res,magnitude,drop_path,dropout", TABLE8)
def test_table8_config_matches_the_paper(model, res, magnitude, drop_path, dropout):
    c = load_config(PretrainConfig, CONFIGS / f"{model}_i{res}.yaml")
    assert (c.model.name, c.data.image_size, c.data.eval_image_size or c.data.image_size) == (model, res, res)
    assert (c.augment.randaugment, c.augment.num_layers, c.augment.magnitude) == ("tf", 2, magnitude)
    assert (c.model.drop_path_rate, c.model.drop_rate) == (drop_path, dropout)
    t = c.train
    assert (t.epochs, t.weight_decay, t.ema_decay, t.label_smoothing) == (350, 4e-5, 0.9999, 0.1)
    assert t.lr * t.batch_size / 256 == pytest.approx(1.6) and t.scale_lr and t.batch_size == 4096
    assert (t.schedule, t.warmup_epochs, t.momentum, t.nesterov) == ("cosine", 5, 0.9, True)
    assert t.ema_warmup and c.model.bn_momentum == 1.0  # BN buffers: last batch, averaged by the EMA
    assert c.model.num_classes == 1000 and c.model.drop_path_schedule == "stage"
    assert c.output_dir == f"runs/pretrain/{model}_i{res}"


@pytest.mark.parametrize("model,res", [(m, r) for m, r, *_ in TABLE8])
def test_rs350_and_rs420_at_320_early_stop_on_minival_as_the_paper(model, res):
    c = load_config(PretrainConfig, CONFIGS / f"{model}_i{res}.yaml")
    early_stopped = res == 320  # the paper: RS-350@320 and RS-420@320, best minival checkpoint reported
    assert c.train.report_best == early_stopped
    assert c.data.eval_split == ("minival" if early_stopped else "val")
    assert c.data.minival_fraction == 0.02 and c.train.eval_every_epochs == (1 if early_stopped else 10)
    assert c.train.eval_last_epochs == 10  # the others evaluate sparsely: every 10th epoch and each of the last 10


def test_every_table8_file_is_tested():
    files = {p.stem for p in CONFIGS.glob("rs*_i*.yaml")} - {"rs152_i224_cotrain"}
    assert files == {f"{m}_i{r}" for m, r, *_ in TABLE8}


# What each Table 1 row adds to the previous one (output_dir aside), as PAPER.md section 3 lists them.
LADDER = {
    "01_cosine.yaml": {"train.schedule": "cosine", "train.decay_epochs": []},
    "02_350_epochs.yaml": {"train.epochs": 350, "train.eval_every_epochs": 10, "train.eval_last_epochs": 10},
    "03_ema.yaml": {"train.ema_decay": 0.9999, "model.bn_momentum": 1.0},
    "04_label_smoothing.yaml": {"train.label_smoothing": 0.1},
    "05_stochastic_depth.yaml": {"model.drop_path_rate": 0.1},
    "06_randaugment.yaml": {"augment.randaugment": "tf", "augment.magnitude": 15},
    "07_dropout.yaml": {"model.drop_rate": 0.25},
    "08_weight_decay.yaml": {"train.weight_decay": 4e-5},
    "09_se.yaml": {"model.name": "resnet200-se"},
    "10_resnet_d.yaml": {"model.name": "rs200"},
}


def test_table1_ladder_rows_each_change_what_the_paper_says():
    base = load_config(PretrainConfig, CONFIGS / "table1" / "00_baseline.yaml")
    assert (base.model.name, base.data.image_size) == ("resnet200", 256)
    assert (base.train.epochs, base.train.schedule) == (90, "step")
    assert base.train.decay_epochs == [30, 60, 80] and base.train.weight_decay == 1e-4
    assert base.train.ema_decay is None and base.train.label_smoothing == 0 and base.augment.randaugment == "none"
    assert base.model.drop_rate == 0 and base.model.drop_path_rate == 0
    assert [f"{row.key}.yaml" for row in TABLE1] == ["00_baseline.yaml"] + list(LADDER)
    previous = _flat(base)
    for name, expected in LADDER.items():
        assert (CONFIGS / "table1" / name).read_text().count("base:") == 1
        current = _flat(load_config(PretrainConfig, CONFIGS / "table1" / name))
        changed = {k: v for k, v in current.items() if previous[k] != v and k != "output_dir"}
        assert changed == expected, name
        previous = current
    final = load_config(PretrainConfig, CONFIGS / "table1" / "10_resnet_d.yaml")
    rs200 = load_config(PretrainConfig, CONFIGS / "rs200_i256.yaml")
    differ = {k for k, v in _flat(final).items() if _flat(rs200)[k] != v}
    assert differ == {"output_dir"}  # the top of the ladder is the Table 8 RS-200 recipe


def test_table2_weight_decay_pairs_differ_only_in_weight_decay():
    files = sorted((CONFIGS / "table2").glob("*_wd1e-4.yaml"))
    assert sorted(f.name.removesuffix("_wd1e-4.yaml") for f in files) == [
        "rs200_none", "rs200_ra_ls", "rs200_ra_ls_sd_do", "rs50_none", "rs50_ra_ls", "rs50_ra_ls_do"]
    for high in files:
        a = _flat(load_config(PretrainConfig, high))
        b = _flat(load_config(PretrainConfig, high.with_name(high.name.replace("wd1e-4", "wd4e-5"))))
        assert (a["train.weight_decay"], b["train.weight_decay"]) == (1e-4, 4e-5)
        assert {k for k in a if a[k] != b[k]} == {"train.weight_decay", "output_dir"}
        setting = high.name.removesuffix("_wd1e-4.yaml").split("_")[1:]
        assert (a["augment.randaugment"] == "tf") == ("ra" in setting)
        assert (a["train.label_smoothing"] == 0.1) == ("ls" in setting)
        assert (a["model.drop_rate"] > 0) == ("do" in setting)
        assert (a["model.drop_path_rate"] > 0) == ("sd" in setting)


def test_table2_rows_use_the_papers_resolution_and_split():
    # The paper reports all of Table 2 on minival (PAPER.md section 3): RS-50 at 224x224, RS-200 at 256 (Table 8's).
    for path in sorted((CONFIGS / "table2").glob("*.yaml")):
        c = load_config(PretrainConfig, path)
        rs50 = path.name.startswith("rs50_")
        assert c.model.name == ("rs50" if rs50 else "rs200"), path.name
        assert (c.data.image_size, c.data.eval_image_size or c.data.image_size) == ((224, 224) if rs50 else (256, 256))
        assert c.data.eval_split == "minival", path.name
        assert c.data.minival_fraction == 0.02 and not c.train.report_best  # Table 2 reports minival, no early stop


def test_table4_cotrain_config_is_rs152_at_224_with_pseudo_labels():
    c = load_config(PretrainConfig, CONFIGS / "rs152_i224_cotrain.yaml", ["cotrain.pseudo_labels=/data/pseudo"])
    assert (c.model.name, c.data.image_size, c.cotrain.enabled, c.cotrain.targets) == ("rs152", 224, True, "soft")
    assert c.cotrain.data_ratio > 0 and c.train.epochs == 350


def test_config_typo_is_a_clear_error():
    with pytest.raises(ConfigError, match="did you mean 'augment.magnitude'"):
        load_config(PretrainConfig, CONFIGS / "rs50_i160.yaml", ["augment.magnitud=5"])


# PAPER.md section 5: Table 5's backbones are vanilla ResNets (no SE, no ResNet-D). "RS": the RS training subset
# (cosine, RandAugment, label smoothing, reduced weight decay, FC dropout), 400 epochs, no stochastic depth, no
# EMA. "supervised": the 90-epoch baseline (Table 1 row 0's recipe).
TABLE5_PRETRAIN = {
    "r152_rs_400ep": ("resnet152", "RS"), "r152x2_rs_400ep": ("resnet152-w2", "RS"),
    "r152_supervised_90ep": ("resnet152", "supervised"), "r152x2_supervised_90ep": ("resnet152-w2", "supervised"),
}


def test_table5_backbone_configs_follow_the_papers_section_5():
    assert {p.stem for p in (CONFIGS / "table5").glob("*.yaml")} == set(TABLE5_PRETRAIN)
    for name, (model, method) in TABLE5_PRETRAIN.items():
        c = load_config(PretrainConfig, CONFIGS / "table5" / f"{name}.yaml")
        t = c.train
        assert c.model.name == model and c.output_dir == f"runs/table5_pretrain/{name}"
        assert c.model.drop_path_rate == 0 and t.ema_decay is None  # no stochastic depth, no EMA, in both
        assert c.model.bn_momentum == 0.1  # no EMA of BN buffers, so BN keeps its own running averages
        assert c.data.image_size == 224 and c.model.num_classes == 1000
        if method == "RS":
            assert t.epochs == 400 and t.schedule == "cosine" and t.label_smoothing == 0.1
            assert c.augment.randaugment == "tf" and c.augment.magnitude == 15 and c.augment.num_layers == 2
            assert c.model.drop_rate == 0.25 and t.weight_decay == 4e-5
        else:
            assert t.epochs == 90 and t.schedule == "step" and t.decay_epochs == [30, 60, 80]
            assert t.weight_decay == 1e-4 and t.label_smoothing == 0 and c.model.drop_rate == 0
            assert c.augment.randaugment == "none"
    # the 2x configs are their 1x twins with the width doubled, nothing else
    for method in ("rs_400ep", "supervised_90ep"):
        one = _flat(load_config(PretrainConfig, CONFIGS / "table5" / f"r152_{method}.yaml"))
        two = _flat(load_config(PretrainConfig, CONFIGS / "table5" / f"r152x2_{method}.yaml"))
        assert {k for k in one if one[k] != two[k]} == {"model.name", "output_dir"}


def test_table5_backbones_are_vanilla_resnets():
    from rs_transfer.models import zoo

    for model, _ in TABLE5_PRETRAIN.values():
        spec = zoo.parse_name(model)
        assert (spec.depth, spec.se, spec.resnet_d) == (152, False, False)
        assert spec.width == (2 if model.endswith("-w2") else 1)


@pytest.mark.parametrize("overrides, named", [
    (["cotrain.pseudo_labels=/data/pseudo"], "cotrain.pseudo_labels=/data/pseudo has no effect with cotrain.enabled="
                                             "false: set cotrain.enabled=true"),
    (["cotrain.targets=hard"], "cotrain.targets=hard has no effect"),
    (["augment.timm_config=rand-m9"], "augment.timm_config=rand-m9 has no effect with augment.randaugment=tf: set "
                                      "augment.randaugment=timm"),
])
def test_a_key_that_acts_only_with_another_is_refused_without_it(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(PretrainConfig, CONFIGS / "demo.yaml", overrides)
    switch = {"cotrain": "cotrain.enabled=true", "augment": "augment.randaugment=timm"}[overrides[0].split(".")[0]]
    load_config(PretrainConfig, CONFIGS / "demo.yaml", [switch, *overrides])  # with its switch it is taken
