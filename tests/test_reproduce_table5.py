"""Table 5 (rs_transfer/reproduce/table5.py) end to end on a generated CIFAR-100: a sweep's best point is collected
into table5.md / table5.json, and the runner sweeps each checkpoint then writes the table (resumable)."""

import json

import pytest
import torch

from engine_toy import CONFIGS
from rs_transfer.downstream import cifar100, finetune
from rs_transfer.models import create_model
from rs_transfer.reproduce import table5

DEMO = CONFIGS / "downstream"


def test_sweep_picks_the_best_point_and_table5_collects_it(tmp_path, capsys):
    cifar100.write_cifar100(tmp_path / "data", train=64, test=20)
    summary = finetune.sweep("cifar100", config_path=DEMO / "cifar100_demo.yaml", learning_rates=[0.001, 0.04],
                             steps=[6], overrides=[f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'sweep'}",
                                                   "train.batch_size=16", "train.warmup_steps=0"])
    points = {p["point"]: p["top1"] for p in summary["points"]}
    assert sorted(points) == ["lr0.001_steps6", "lr0.04_steps6"]
    assert summary["best"]["top1"] == max(points.values())
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == summary
    table5.reproduce_table5([f"mine:cifar100={tmp_path / 'sweep'}"], tmp_path / "table")
    table = json.loads((tmp_path / "table" / "table5.json").read_text())
    assert table["ours"][0]["cifar100"] == pytest.approx(100 * summary["best"]["top1"])
    assert table["ours"][0]["pascal_seg"] is None
    markdown = (tmp_path / "table" / "table5.md").read_text()
    assert "| paper R152 RS (400 ep) | 88.1 | 82.2 | 78.2 | 42.2 | 83.4 |" in markdown


def test_table5_runner_sweeps_each_checkpoint_then_writes_the_table(tmp_path):
    cifar100.write_cifar100(tmp_path / "data", train=64, test=20)
    torch.manual_seed(0)
    torch.save(create_model("rs26-w0.25").state_dict(), tmp_path / "tiny.pth")
    grid = dict(config_path=DEMO / "cifar100_demo.yaml", learning_rates=[0.04], steps=[6])
    args = (["tiny net=rs26-w0.25:" + str(tmp_path / "tiny.pth")], [f"cifar100={tmp_path / 'data'}"], tmp_path / "t5",
            ["train.batch_size=16", "train.warmup_steps=0"])
    table = table5.run_table5(*args, **grid)
    run = tmp_path / "t5" / "runs" / "tiny_net" / "cifar100"
    best = json.loads((run / "sweep.json").read_text())["best"]
    assert best["point"] == "lr0.04_steps6"
    assert [r["label"] for r in table["ours"]] == ["tiny net"]
    assert table["ours"][0]["cifar100"] == pytest.approx(100 * best["top1"])
    assert json.loads((tmp_path / "t5" / "table5.json").read_text())["ours"] == table["ours"]
    stamp = (run / "lr0.04_steps6" / "final_metrics.json").stat().st_mtime_ns
    table5.run_table5(*args, **grid)  # a second call resumes: the finished point is not trained again
    assert (run / "lr0.04_steps6" / "final_metrics.json").stat().st_mtime_ns == stamp
    # --dry-run lists every run of the grid (the finished one said so) and writes nothing
    dry_args = (args[0], [*args[1], f"pascal_seg={tmp_path / 'voc'}"], tmp_path / "t5", args[3])
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "t5").rglob("*"))
    plan = table5.run_table5(*dry_args, learning_rates=[0.04, 0.1], steps=[6, 12], dry_run=True)["runs"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "t5").rglob("*")) == before
    assert len(plan) == 8 and {r["task"] for r in plan} == {"cifar100", "pascal_seg"}
    assert [r["folder"] for r in plan if r["finished"]] == [str(run / "lr0.04_steps6")]


def test_a_sliding_window_result_is_read_by_its_own_name_and_marked(tmp_path):
    # A pascal_seg sweep evaluated with task.eval_mode=slide records "miou_slide": Table 5 reads that name (its
    # final_metrics.json have no "miou") and says next to the table that the number is not single-scale whole.
    from rs_transfer.families import primary_metric

    sweep = tmp_path / "sweep"
    for point, value in (("lr0.01_steps5000", 0.5), ("lr0.02_steps5000", 0.7)):
        (sweep / point).mkdir(parents=True)
        (sweep / point / "final_metrics.json").write_text(json.dumps({"miou_slide": value}))
    summary = finetune.collect_sweep(sweep, "pascal_seg", "miou_slide")
    assert summary["metric"] == "miou_slide" and summary["best"]["miou_slide"] == 0.7
    table5.reproduce_table5([f"mine:pascal_seg={sweep}"], tmp_path / "table")
    table = json.loads((tmp_path / "table" / "table5.json").read_text())
    assert table["ours"][0]["pascal_seg"] == pytest.approx(70.0)
    assert table["other_metrics"] == ["mine pascal_seg: miou_slide"]
    assert "Not single-scale whole-image" in (tmp_path / "table" / "table5.md").read_text()
    # `rs-transfer runs` on a run without summary.json reads the name from its config.yaml's task section
    assert primary_metric("transfer", "pascal_seg", {"eval_mode": "slide"}) == "miou_slide"
