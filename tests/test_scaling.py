"""The scaling study (`rs-transfer scale`): Appendix E's regularisation at every grid point, the 300/400 layouts,
the stable `scale plan --json` interface, and a tiny study through plan, run, report and suggest on CPU."""

import json
import re
from pathlib import Path

import pytest
import torch

from rs_transfer import cli
from rs_transfer.config import load_config
from rs_transfer.errors import UserError
from rs_transfer.models import zoo
from rs_transfer.pretrain.config import PretrainConfig
from rs_transfer.reproduce import scaling, scaling_report

# Appendix E (PAPER.md section 3), written out as tables rather than as the module's rules.
DROPOUT_350 = {0.25: 0.0, 0.5: 0.1, 1.0: 0.25, 1.5: 0.6, 2.0: 0.75}
# RandAugment magnitude at 350 epochs by (width, resolution): 10 for widths 0.25-0.5 or resolutions 64-160,
# 15 for 224-320, 20 otherwise.
RA_350 = {(w, r): 10 if w in (0.25, 0.5) or r in (128, 160) else 15 if r in (224, 320) else 20
          for w in zoo.SCALING_WIDTHS for r in zoo.SCALING_RESOLUTIONS}
SD_350 = {(w, r): 0.0 if w == 0.25 or r in (128, 160) else 0.2
          for w in zoo.SCALING_WIDTHS for r in zoo.SCALING_RESOLUTIONS}
FAST = ["data.num_workers=0", "train.log_every_steps=4"]


def test_the_paper_grid_and_the_300_400_layouts():
    assert zoo.SCALING_DEPTHS == (26, 50, 101, 200, 300, 350, 400)
    assert zoo.SCALING_WIDTHS == (0.25, 0.5, 1.0, 1.5, 2.0)
    assert zoo.SCALING_RESOLUTIONS == (128, 160, 224, 320, 448)
    assert scaling.REGIMES == (10, 100, 350)
    assert zoo.LAYOUTS[300] == (4, 36, 54, 4)
    assert zoo.LAYOUTS[400] == (6, 48, 72, 6)
    from rs_transfer.models import create_model

    for depth in (300, 400):
        with torch.device("meta"):  # the structure only: no memory, no init time
            model = create_model(f"rs{depth}-w0.25", num_classes=2, init="timm")
        blocks = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
        assert blocks == zoo.LAYOUTS[depth]


def test_every_grid_point_has_appendix_e_regularisation():
    points = scaling.plan(None, zoo.SCALING_DEPTHS, zoo.SCALING_WIDTHS, zoo.SCALING_RESOLUTIONS, scaling.REGIMES)
    assert len(points) == 7 * 5 * 5 * 3
    for p in points:
        assert p["model"] == f"rs{p['depth']}-w{p['width']:g}" and p["config"] is None
        assert p["weight_decay"] == 4e-5
        if p["epochs"] == 350:
            key = (p["width"], p["resolution"])
            assert (p["dropout"], p["randaugment_magnitude"], p["stochastic_depth"], p["label_smoothing"]) == \
                (DROPOUT_350[p["width"]], RA_350[key], SD_350[key], 0.1), p
        else:  # 10 and 100 epochs: flips and crops only
            assert (p["dropout"], p["randaugment_magnitude"], p["stochastic_depth"], p["label_smoothing"]) == \
                (0.0, None, 0.0, 0.0), p


def test_efficientnet_rs_points_use_section_7_2_randaugment():
    points = scaling.plan(None, [], [1.0], [160, 224, 256, 320, 448], [350], efficientnet=["b0", "b7"])
    got = {(p["model"], p["resolution"]): p["randaugment_magnitude"] for p in points}
    # reduced resolutions only: below each model's original (B0 224, B7 600)
    assert got == {("efficientnet_b0", 160): 10, ("efficientnet_b7", 160): 10, ("efficientnet_b7", 224): 10,
                   ("efficientnet_b7", 256): 15, ("efficientnet_b7", 320): 15, ("efficientnet_b7", 448): 20}
    with pytest.raises(UserError, match="b9"):
        scaling.plan(None, [], [1.0], [224], [350], efficientnet=["b9"])


def test_plan_json_is_the_stable_interface(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = "scale plan --depths 50,200 --widths 0.25,1.5 --resolutions 128,448 --epochs 10,350 --json".split()
    assert cli.main(argv) == 0
    points = json.loads(capsys.readouterr().out)
    assert len(points) == 16
    point = next(p for p in points if p["model"] == "rs200-w1.5" and p["resolution"] == 448 and p["epochs"] == 350)
    config = point.pop("config")
    assert point == {"model": "rs200-w1.5", "depth": 200, "width": 1.5, "resolution": 448, "epochs": 350,
                     "dropout": 0.6, "randaugment_magnitude": 20, "stochastic_depth": 0.2, "label_smoothing": 0.1,
                     "weight_decay": 4e-05}
    loaded = load_config(PretrainConfig, config)
    assert (loaded.model.name, loaded.model.drop_rate, loaded.model.drop_path_rate) == ("rs200-w1.5", 0.6, 0.2)
    assert (loaded.augment.randaugment, loaded.augment.magnitude, loaded.augment.num_layers) == ("tf", 20, 2)
    assert (loaded.data.image_size, loaded.train.epochs, loaded.train.label_smoothing) == (448, 350, 0.1)
    assert loaded.train.weight_decay == 4e-5 and loaded.train.ema_decay == 0.9999  # the RS recipe underneath
    short = next(p for p in points if p["epochs"] == 10)
    assert short["randaugment_magnitude"] is None
    assert load_config(PretrainConfig, short["config"]).augment.randaugment == "none"
    assert cli.main(argv + ["--dry-run"]) == 0
    assert all(p["config"] is None for p in json.loads(capsys.readouterr().out))


def test_plan_dry_run_says_the_totals_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["scale", "plan", "--depths", "26,50", "--widths", "0.5", "--resolutions", "128,160",
                     "--epochs", "10,100", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 points (4 x 10, 4 x 100 epochs): 440 epochs in all, 5.64e+08 training images" in out
    assert "dry run: nothing written" in out and not any(tmp_path.iterdir())


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert cli.main(["scale", "plan", "--depths", "51", "--dry-run"]) == 2
    assert "--depths 51" in capsys.readouterr().err
    assert cli.main(["scale", "plan", "--widths", "0.75", "--epochs", "350", "--dry-run"]) == 2
    assert "0.75" in capsys.readouterr().err
    out = tmp_path / "study"
    assert cli.main(["scale", "plan", "--depths", "26", "--widths", "0.25", "--resolutions", "32", "--epochs", "1",
                     "--out", str(out), "train.batch_sise=4"]) == 2
    assert "batch_sise" in capsys.readouterr().err
    assert cli.main(["scale", "run", "--study", str(tmp_path / "none")]) == 2
    assert "plan.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the two budgets are mutually exclusive
        cli.main(["scale", "suggest", "--budget-flops", "1", "--budget-latency", "1", "--epochs", "10"])


def test_run_skips_finished_points_and_resumes_the_others(tmp_path):
    study = tmp_path / "study"
    scaling.plan(study, [26], [0.25, 0.5], [32], [2], base="scaling/demo.yaml")
    calls = []
    scaling.run(study, train=lambda config, overrides: calls.append((config, overrides)))
    assert [c[0].rsplit("/", 1)[1] for c in calls] == ["rs26-w0.25_i32_e2.yaml", "rs26-w0.5_i32_e2.yaml"]
    assert all("train.resume=auto" in overrides for _, overrides in calls)
    points = scaling.load_plan(study)
    finished = scaling.run_dir(study, points[0])
    finished.mkdir(parents=True)
    (finished / "final_metrics.json").write_text('{"top1": 0.5}')
    calls.clear()
    assert scaling.run(study, overrides=["data.root=/data"], train=lambda c, o: calls.append(o)) == ["rs26-w0.5_i32_e2"]
    assert calls[0][0] == "data.root=/data"
    assert scaling.run(study, point=0, train=lambda c, o: calls.append(o)) == []
    with pytest.raises(UserError, match="points 0-1"):
        scaling.run(study, point=2)


def test_a_planned_350_epoch_config_trains(tmp_path):
    """RandAugment, dropout and label smoothing on: one epoch of rs26-w0.5 at 32 px on a generated dataset."""
    study = tmp_path / "study"
    (point,) = scaling.plan(study, [26], [0.5], [32], [350], base="scaling/demo.yaml", overrides=FAST)
    assert (point["dropout"], point["randaugment_magnitude"], point["label_smoothing"]) == (0.1, 10, 0.1)
    assert scaling.run(study, synthetic=True, overrides=["train.epochs=1"]) == ["rs26-w0.5_i32_e350"]
    metrics = json.loads((scaling.run_dir(study, point) / "final_metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= 1.0


def test_tiny_study_plan_run_report_suggest(tmp_path, capsys):
    study = tmp_path / "study"
    assert cli.main(["scale", "plan", "--base", "scaling/demo.yaml", "--depths", "26,50", "--widths", "0.25",
                     "--resolutions", "32", "--epochs", "1", "--out", str(study), *FAST]) == 0
    assert cli.main(["scale", "run", "--study", str(study), "--synthetic"]) == 0
    assert "rs50-w0.25_i32_e1" in capsys.readouterr().out
    assert cli.main(["scale", "run", "--study", str(study), "--synthetic"]) == 0
    assert "none (all finished)" in capsys.readouterr().out

    assert cli.main(["scale", "report", "--study", str(study)]) == 0
    document = json.loads((study / "scaling.json").read_text())
    assert document["finished"] == document["planned"] == 2 and "throughput" in document["latency_source"]
    for p in document["points"]:
        assert p["gflops"] > 0 and p["latency_s_per_128"] > 0 and 0 <= p["top1"] <= 1
    assert any(p["pareto_gflops"] for p in document["points"])
    assert (study / "scaling_flops.png").stat().st_size > 0 and (study / "scaling_latency.png").stat().st_size > 0
    assert "| rs50-w0.25 | 32 | 1 |" in (study / "scaling.md").read_text()

    class Measured:
        train_s_per_128 = 0.5

    scaling_report.report(study, latency="measure", device="cpu", measure_fn=lambda spec, device: Measured())
    assert {p["latency_s_per_128"] for p in json.loads((study / "scaling.json").read_text())["points"]} == {0.5}

    result = scaling_report.suggest(10, budget_flops=1.0, study=study)
    assert "scale width" in result["strategy"] and result["recommended"]["model"] in ("rs26-w0.25", "rs50-w0.25")
    assert len(result["points"]) == 2
    assert scaling_report.suggest(10, budget_flops=1e-6, study=study)["recommended"] is None
    assert cli.main(["scale", "suggest", "--study", str(study), "--budget-flops", "1", "--epochs", "1"]) == 0
    assert "recommended:" in capsys.readouterr().out


def test_suggest_without_a_study_uses_the_paper():
    long = scaling_report.suggest(350, budget_flops=25)
    assert "scale depth" in long["strategy"]
    assert (long["recommended"]["model"], long["recommended"]["resolution"]) == ("rs152", 224)  # Table 7: 24 GFLOPs
    short = scaling_report.suggest(10, budget_latency=0.5)
    assert "scale width" in short["strategy"]
    assert short["recommended"]["model"].startswith("rs50-w") and short["recommended"]["top1"] is None
    assert scaling_report.suggest(350, budget_latency=0.1)["recommended"] is None
    with pytest.raises(UserError, match="exactly one"):
        scaling_report.suggest(350)


def test_a_planned_efficientnet_rs_point_trains(tmp_path):
    """Section 7.2's point is timm's efficientnet_b0 with the plan's dropout, drop-connect and RandAugment: three
    steps at 32 px on a generated dataset."""
    study = tmp_path / "study"
    (point,) = scaling.plan(study, [], [1.0], [32], [350], efficientnet=["b0"], base="scaling/demo.yaml",
                            overrides=FAST)
    assert (point["model"], point["randaugment_magnitude"], point["dropout"]) == ("efficientnet_b0", 10, 0.2)
    loaded = load_config(PretrainConfig, point["config"])
    assert (loaded.model.name, loaded.model.drop_rate, loaded.model.drop_path_rate) == ("efficientnet_b0", 0.2, 0.2)
    assert (loaded.augment.magnitude, loaded.train.weight_decay) == (10, 1e-5)
    short = ["train.epochs=null", "train.steps=3", "train.batch_size=16", "train.warmup_epochs=0"]
    assert scaling.run(study, synthetic=True, overrides=short) == ["efficientnet_b0_i32_e350"]
    run = scaling.run_dir(study, point)
    assert 0.0 <= json.loads((run / "final_metrics.json").read_text())["top1"] <= 1.0
    from rs_transfer.models.weights import read_state_dict

    assert "classifier.weight" in read_state_dict(run / "weights.pth")  # timm's EfficientNet, not a zoo ResNet


def test_efficientnet_refuses_resnet_switches():
    from rs_transfer.models import create_model
    from rs_transfer.pretrain.task import build_model

    net = create_model("efficientnet_b0", num_classes=3, drop_rate=0.3, drop_path_rate=0.1, init="official",
                       bn_momentum=0.1, zero_init_last=True, drop_path_schedule="stage")
    assert type(net).__name__ == "EfficientNet" and net.drop_rate == 0.3 and net.classifier.out_features == 3
    for key, value in (("bn_momentum", 1.0), ("init", "timm"), ("zero_init_last", False),
                       ("drop_path_schedule", "block")):
        with pytest.raises(UserError, match=f"{key}={value!r} is a ResNet-only switch"):
            create_model("efficientnet_b0", num_classes=3, **{key: value})
    with pytest.raises(UserError, match="features_only"):
        create_model("efficientnet_b0", num_classes=0, features_only=True)
    config = load_config(PretrainConfig, "pretrain/recipe.yaml", ["model.name=efficientnet_b0"])  # bn_momentum 1.0
    with pytest.raises(UserError, match="model.bn_momentum"):
        build_model(config)


def test_report_plots_efficientnet_rs_points_beside_the_resnets(tmp_path):
    """Points finished by hand (final_metrics.json and a metrics.jsonl train record): no training needed."""
    study = tmp_path / "study"
    points = scaling.plan(study, [26], [0.25], [32], [350], efficientnet=["b0"], base="scaling/demo.yaml")
    for point, (top1, rate) in zip(points, ((0.5, 256.0), (0.6, 128.0))):
        folder = scaling.run_dir(study, point)
        folder.mkdir(parents=True)
        (folder / "final_metrics.json").write_text(json.dumps({"top1": top1}))
        (folder / "metrics.jsonl").write_text(json.dumps({"kind": "train", "images_per_s": rate}) + "\n")
    scaling_report.report(study)
    document = json.loads((study / "scaling.json").read_text())
    got = {p["model"]: (p["top1"], p["latency_s_per_128"], p["depth"]) for p in document["points"]}
    assert got == {"rs26-w0.25": (0.5, 0.5, 26), "efficientnet_b0": (0.6, 1.0, None)}
    assert document["finished"] == document["planned"] == 2
    assert "| efficientnet_b0 | 32 | 350 |" in (study / "scaling.md").read_text()
    assert (study / "scaling_latency.png").stat().st_size > 0


def test_planning_into_a_study_keeps_its_finished_points(tmp_path, capsys):
    """A second `scale plan --out STUDY` merges: existing points (finished or not) stay, new ones are added."""
    study = tmp_path / "study"
    (first,) = scaling.plan(study, [26], [0.25], [32], [2], base="scaling/demo.yaml")
    config = Path(first["config"])
    config_text = config.read_text()
    folder = scaling.run_dir(study, first)
    folder.mkdir(parents=True)
    (folder / "final_metrics.json").write_text('{"top1": 0.5}')
    assert cli.main(["scale", "plan", "--base", "scaling/demo.yaml", "--depths", "50,26", "--widths", "0.25",
                     "--resolutions", "32", "--epochs", "2", "--out", str(study), "train.batch_size=8"]) == 0
    keys = [scaling.point_key(p) for p in scaling.load_plan(study)]
    assert keys == ["rs26-w0.25_i32_e2", "rs50-w0.25_i32_e2"]  # the same key is the same point: kept, not doubled
    assert config.read_text() == config_text  # a finished point's config is not rewritten
    assert [p["model"] for p in scaling_report.collect(study)] == ["rs26-w0.25"]


def test_base_and_overrides_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "study"
    grid = ["scale", "plan", "--depths", "26", "--widths", "0.25", "--resolutions", "32", "--epochs", "1"]
    # an abyss and a Python tag in an override were read unbounded before they were checked (a RecursionError and
    # a ConstructorError traceback)
    deep, tag = "train.lr=" + "[" * 3000 + "]" * 3000, "train.lr=!!python/object/apply:os.system ['touch owned']"
    for extra in (["--base", "nope.yaml"], ["train.batchsize=3"], [deep], [tag]):
        for mode in (["--dry-run"], ["--out", str(out)]):
            assert cli.main(grid + extra + mode) == 2
            err = capsys.readouterr().err
            assert err.count("error:") == 1 and "Traceback" not in err, err
            assert "--base nope.yaml" in err or extra[0][:20] in err, err  # the override as typed
            assert not out.exists() and not Path("owned").exists()


@pytest.mark.parametrize("option, value", [("--budget-flops", "-1"), ("--budget-flops", "nan"),
                                           ("--budget-latency", "0"), ("--budget-latency", "inf")])
def test_suggest_refuses_a_budget_that_is_not_positive_and_finite(option, value, capsys):
    assert cli.main(["scale", "suggest", option, value, "--epochs", "350"]) == 2
    assert option in capsys.readouterr().err


def test_repeated_values_in_a_list_option_are_planned_once(capsys):
    argv = ["scale", "plan", "--depths", "26,50,26", "--widths", "0.25,0.25", "--resolutions", "32,32",
            "--epochs", "2,2", "--efficientnet", "b0,b0", "--dry-run", "--json"]
    assert cli.main(argv) == 0
    models = [p["model"] for p in json.loads(capsys.readouterr().out)]
    assert models == ["rs26-w0.25", "rs50-w0.25", "efficientnet_b0"]


@pytest.mark.parametrize("edit, message", [
    (lambda plan: {"points": 5}, 'not a scale plan \\(expected an object whose "points" is a list'),
    (lambda plan: [1, 2], "not a scale plan"),
    (lambda plan: {"points": [5]}, "point 0 is a JSON int, not an object"),
    (lambda plan: {"points": [{**plan["points"][0], "depth": "26"}]}, "point 0 has depth = '26': expected int or null"),
    (lambda plan: {"points": [{"model": "rs26-w0.25"}]}, "point 0 has depth = None: expected int or null"),
    (lambda plan: {"points": [{**plan["points"][0], "model": "../../escaped/x"}]}, "point 0 \\('../../escaped/x' "
     "at 32 px, 2 epochs\\) is not a point a plan writes"),
    (lambda plan: "[" * 100000, "not a scale plan"),  # JSON nested past Python's recursion limit
])
def test_a_hand_edited_plan_is_one_error_line_in_run_and_report(tmp_path, capsys, edit, message):
    study = tmp_path / "study"
    scaling.plan(study, [26], [0.25], [32], [2], base="scaling/demo.yaml")
    edited = edit(json.loads((study / "plan.json").read_text()))
    (study / "plan.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    for command in (["scale", "run", "--study", str(study)], ["scale", "report", "--study", str(study)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {study / 'plan.json'}: ") and len(err.strip().splitlines()) == 1
        assert re.search(message, err), err
