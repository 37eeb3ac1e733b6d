"""`video train` end to end through the engine: the demo learns motion direction on CPU; 2-process gloo DDP runs a
step and evaluates every video once; `video eval` reproduces the run's own final evaluation from its checkpoint."""

import json

import pytest
import torch

from engine_toy import CONFIGS
from forked_ranks import run_ranks
from rs_transfer.cli import main

DEMO = CONFIGS / "video" / "demo.yaml"


@pytest.mark.slow
def test_demo_learns_motion_direction_and_eval_reproduces_it(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="rs_transfer")
    out = tmp_path / "run"
    assert main(["video", "train", "--config", str(DEMO), f"output_dir={out}", f"data.root={tmp_path / 'data'}"]) == 0
    assert capsys.readouterr().out.count('"top1"') == 1  # the final metrics, printed once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ") and "eta" in r.getMessage()]
    assert lines and all(" clips/s " in line for line in lines if "(this process)" not in line)  # a sample is a clip
    final = json.loads((out / "final_metrics.json").read_text())
    # 4 directions, 16 validation videos: chance is 0.25; a single frame carries no direction. Measured 0.9375 at
    # seed 0 (and 0.94, 0.56, 0.69 at seeds 1-3): same seed, same run, so the margin is for other CPUs' arithmetic.
    assert final["top1"] >= 0.5 and final["videos"] == 16
    assert (out / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["video", "eval", "--checkpoint", str(out / "final.pt"), "--views", "3"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["top1"] == final["top1"] and evaluated["views"] == 3
    assert (out / "eval_3views.json").is_file()
    # The engine's weights.pth (the 3D network alone) gives the same evaluation.
    assert main(["video", "eval", "--checkpoint", str(out / "weights.pth"), "--views", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == final["top1"]
    assert main(["video", "eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_two_process_gloo_ddp_one_step(tmp_path):
    out = tmp_path / "ddp"
    result = run_ranks(main, ["video", "train", "--config", str(DEMO), f"output_dir={out}",
                              f"data.root={tmp_path / 'data'}", "train.epochs=null", "train.steps=1",
                              "train.batch_size=4", "data.eval_views=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["videos"] == 16 and final["skipped"] == 0  # each rank evaluated half, summed over ranks
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == [1]
    assert torch.load(out / "final.pt", weights_only=True)["model"]["net.fc.weight"].shape == (4, 256)
