"""`rs-transfer bench ...` end to end on CPU: flops against PAPER.md Table 7, latency and table7 --json/--from."""

import json

import pytest

from rs_transfer.cli import main
from rs_transfer.models.zoo import table7_rows


def test_flops_json_matches_paper_table7(capsys):
    assert main(["bench", "flops", "rs50@160", "efficientnet_b0@224", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [set(r) for r in rows] == [{"model", "resolution", "params_m", "gflops"}] * 2
    assert [(r["model"], r["resolution"]) for r in rows] == [("rs50", 160), ("efficientnet_b0", 224)]
    rs50, b0 = table7_rows("rs50")[0], table7_rows("efficientnet_b0")[0]
    assert rows[0]["gflops"] == pytest.approx(rs50.gflops, rel=0.03)  # fvcore: 4.58
    assert rows[0]["params_m"] == pytest.approx(rs50.params_m, rel=0.02)
    # fvcore counts 0.80 for B0: convs 0.77 + eval BN 0.03 + FC; not SiLU or the SE multiply
    assert rows[1]["gflops"] == pytest.approx(b0.gflops, rel=0.05)
    assert rows[1]["params_m"] == pytest.approx(b0.params_m, rel=0.02)


def test_flops_text_output(capsys):
    assert main(["bench", "flops", "rs26-w0.25@32"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["model", "params", "M", "GFLOPs"]
    assert out.splitlines()[1].startswith("rs26-w0.25@32")


def test_latency_json_on_cpu_bf16_channels_last(capsys):
    assert main(["bench", "latency", "--models", "rs26-w0.25@32", "--device", "cpu", "--batch", "2",
                 "--warmup", "0", "--repeats", "1", "--dtype", "bf16", "--channels-last", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["model"], result["resolution"], result["batch"]) == ("rs26-w0.25", 32, 2)
    assert result["dtype"] == "bf16" and result["channels_last"] is True
    assert result["train_s_per_128"] == pytest.approx(result["train_step_s"] * 64)
    assert result["peak_mem_gb"] is None and result["device"].startswith("cpu")


def test_table7_from_saved_results(tmp_path, capsys):
    part = [{
        "model": "rs50", "resolution": 160, "device": "cpu: test", "dtype": "fp32", "channels_last": False,
        "start_batch": 8, "batch": 8, "train_step_s": 0.5, "train_s_per_128": 8.0, "train_img_s": 16.0,
        "infer_batch": 8, "infer_img_s": 40.0, "peak_mem_gb": None, "warmup": 1, "repeats": 3,
        "train_step_times_s": [0.5, 0.5, 0.5], "torch_version": "x",
    }]
    (tmp_path / "part.json").write_text(json.dumps(part))
    assert main(["bench", "table7", "--from", str(tmp_path / "part.json"), "--out", str(tmp_path / "t7")]) == 0
    out = capsys.readouterr().out
    assert "# Table 7 measured on cpu: test" in out and "| rs50 | 160 | 78.8 | 0.31 | 8.000 | 8 | n/a |" in out
    assert sorted(p.name for p in (tmp_path / "t7").iterdir()) == ["pareto.png", "table7.json", "table7.md"]


def test_bench_user_errors_exit_2(capsys):
    assert main(["bench", "flops", "rs50"]) == 2
    assert "expected NAME@RES" in capsys.readouterr().err
    assert main(["bench", "latency", "--models", "nosuchnet@64", "--device", "cpu"]) == 2
    assert "unknown model 'nosuchnet'" in capsys.readouterr().err
    assert main(["bench", "table7", "--only", "rs50@999", "--device", "cpu", "--out", "/nonexistent/x"]) == 2
    assert "not a Table 7 row" in capsys.readouterr().err
    assert main(["bench", "latency", "--models", "rs50@160", "--device", "cpu", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
