"""Table 7 (rs_transfer/reproduce/table7.py): rows, files, ratios at equal accuracy, resume, and the refusal to mix
devices."""

import json
import math

import pytest
import torch

from rs_transfer.bench.latency import LatencyResult, device_name
from rs_transfer.errors import UserError
from rs_transfer.models.zoo import TABLE7
from rs_transfer.reproduce.table7 import (
    check_one_setup, interpolate_latency, run_table7, speedups, table7_specs, write_table7,
)

CPU = torch.device("cpu")


def fake_result(spec, device=None, scale=10.0, dtype="fp32", channels_last=False, start_batch=8, **_):
    """A measurement without running anything: latency = scale x the paper's V100 latency."""
    paper = next(r for r in TABLE7 if (r.model, r.resolution) == (spec.name, spec.resolution))
    s_per_128 = paper.v100_s * scale
    return LatencyResult(
        model=spec.name, resolution=spec.resolution, device=device or device_name(CPU), dtype=dtype,
        channels_last=channels_last, start_batch=start_batch, batch=start_batch,
        train_step_s=s_per_128 * start_batch / 128, train_s_per_128=s_per_128, train_img_s=128 / s_per_128,
        infer_batch=start_batch, infer_img_s=300 / s_per_128, peak_mem_gb=None, warmup=1, repeats=3,
        train_step_times_s=[s_per_128 * start_batch / 128] * 3,
    )


class FakeMeasure:
    def __init__(self):
        self.calls = []

    def __call__(self, spec, device, **kwargs):
        self.calls.append(str(spec))
        return fake_result(spec, **kwargs)


def test_interpolation_is_linear_in_log_latency():
    points = [(80.0, 1.0), (82.0, 4.0), (77.0, 0.5)]
    assert interpolate_latency(points, 81.0) == pytest.approx(2.0)  # geometric mean of 1 and 4
    assert interpolate_latency(points, 82.0) == pytest.approx(4.0)
    assert interpolate_latency(points, 78.5) == pytest.approx(math.sqrt(0.5))
    assert interpolate_latency(points, 76.0) is None and interpolate_latency(points, 83.0) is None


def test_paper_speedups_reproduce_the_headline():
    ratios = speedups({f"{r.model}@{r.resolution}": r.v100_s for r in TABLE7})
    assert len(ratios) == 11 and all(v is not None for v in ratios.values())
    # PAPER.md: "2.1-3.3x on GPU at equal accuracy"; RS-350@256 and B6 share 84.0 top-1: 15.7 / 4.72
    assert 2.1 <= min(ratios.values()) < 2.2
    assert ratios["rs350@256"] == pytest.approx(15.7 / 4.72)
    assert round(max(ratios.values()), 1) == 3.3


def test_tpu_latencies_are_the_papers_and_reproduce_its_tpu_headline():
    # PAPER.md section 2, Table 7's TPUv3 column (ms per 1024 images), RS rows and EfficientNet B0..B7
    tpu = {f"{r.model}@{r.resolution}": r.tpu_ms for r in TABLE7}
    assert [tpu[f"efficientnet_b{i}@{res}"] for i, res in enumerate((224, 240, 260, 300, 380, 456, 528, 600))] == [
        90, 150, 210, 340, 710, 1510, 3010, 6020]
    assert [tpu[s] for s in ("rs50@160", "rs101@160", "rs101@192", "rs152@192", "rs152@224", "rs152@256", "rs200@256",
                             "rs270@256", "rs350@256", "rs350@320", "rs420@320")] == [
        70, 120, 170, 240, 320, 410, 570, 780, 1100, 1630, 2090]
    ratios = speedups(tpu)
    assert len(ratios) == 11 and all(v is not None for v in ratios.values())
    # "RS is 1.7-2.7x faster on TPU": RS-350@256 and B6 share 84.0 top-1, 3010 / 1100
    assert 1.7 <= min(ratios.values()) < 1.8 and 2.7 <= max(ratios.values()) < 2.8
    assert ratios["rs350@256"] == pytest.approx(3010 / 1100)


def test_table7_writes_all_rows_md_json_png(tmp_path):
    fake = FakeMeasure()
    paths = run_table7(tmp_path, CPU, start_batch=8, warmup=1, repeats=3, measure_fn=fake)
    assert [p.name for p in paths] == ["table7.json", "table7.md", "pareto.png"]
    assert fake.calls == [str(s) for s in table7_specs()] and len(fake.calls) == 19
    data = json.loads((tmp_path / "table7.json").read_text())
    assert data["device"] == device_name(CPU) and data["dtype"] == "fp32"
    rows = {f"{r['model']}@{r['resolution']}": r for r in data["rows"]}
    assert len(rows) == 19
    assert rows["rs50@160"]["v100_s_per_128_paper"] == 0.31
    assert rows["rs50@160"]["s_per_128"] == pytest.approx(3.1)
    # latencies proportional to the paper's give the paper's ratios
    for spec, row in rows.items():
        if spec.startswith("rs"):
            assert row["speedup_measured"] == pytest.approx(row["speedup_paper"])
        else:
            assert row["speedup_measured"] is None and row["speedup_paper"] is None
    md = (tmp_path / "table7.md").read_text()
    assert md.startswith(f"# Table 7 measured on {device_name(CPU)}")
    table_lines = [line for line in md.splitlines() if line.startswith("| rs") or line.startswith("| efficientnet")]
    assert len(table_lines) == 19
    assert "| rs350 | 256 | 84.0 | 4.72 | 47.200 | 8 | n/a |" in md
    # the paper's TPUv3 latencies and speed-ups, beside the measured columns (nothing here runs on a TPU)
    assert rows["efficientnet_b6@528"]["tpu_ms_per_1024_paper"] == 3010
    assert rows["rs50@160"]["tpu_ms_per_1024_paper"] == 70
    assert rows["rs350@256"]["speedup_tpu_paper"] == pytest.approx(3010 / 1100)
    assert rows["efficientnet_b0@224"]["speedup_tpu_paper"] is None
    assert "| TPUv3 ms/1024 (paper) | RS speed-up x (paper, TPUv3) |" in md
    assert md.count(" | 1100 | 2.74 |") == 1 and "| 6020 | - |" in md
    assert "- paper (TPUv3): 1.76x to 2.74x over 11 RS rows" in md
    assert "- paper (V100): 2.18x to 3.33x over 11 RS rows" in md
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table7_subset_then_resume(tmp_path):
    fake = FakeMeasure()
    only = [s for s in table7_specs() if str(s) in ("rs50@160", "efficientnet_b0@224", "efficientnet_b1@240")]
    run_table7(tmp_path, CPU, only=only, measure_fn=fake)
    data = json.loads((tmp_path / "table7.json").read_text())
    measured = [r for r in data["rows"] if r["s_per_128"] is not None]
    assert len(measured) == 3 and len(data["rows"]) == 19
    assert next(r for r in measured if r["model"] == "rs50")["speedup_measured"] is not None
    # a second run measures only what is missing; --fresh measures everything again
    run_table7(tmp_path, CPU, only=only[:1] + [table7_specs()[1]], measure_fn=fake)
    assert fake.calls == ["rs50@160", "efficientnet_b0@224", "efficientnet_b1@240", "rs101@160"]
    run_table7(tmp_path, CPU, only=only[:1], fresh=True, measure_fn=fake)
    assert fake.calls[-1] == "rs50@160"
    with pytest.raises(UserError, match="not a Table 7 row"):
        run_table7(tmp_path, CPU, only=[type(only[0])("rs50", 224)], measure_fn=fake)


def test_refuses_to_mix_devices(tmp_path):
    specs = table7_specs()
    gpu = [fake_result(s, device="NVIDIA H100 80GB HBM3") for s in specs[:2]]
    cpu = [fake_result(s) for s in specs[2:4]]
    with pytest.raises(UserError, match="mix device values.*NVIDIA H100.*rs50@160"):
        check_one_setup(gpu + cpu)
    with pytest.raises(UserError, match="mix dtype"):
        write_table7(cpu + [fake_result(specs[5], dtype="bf16")], tmp_path)
    # merging saved files from two devices is refused too, naming the files
    (tmp_path / "gpu.json").write_text(json.dumps([r.to_dict() for r in gpu]))
    (tmp_path / "cpu.json").write_text(json.dumps([r.to_dict() for r in cpu]))
    with pytest.raises(UserError, match="gpu.json \\+ .*cpu.json mix device"):
        run_table7(tmp_path / "out", sources=[tmp_path / "gpu.json", tmp_path / "cpu.json"])
    # and resuming a table measured elsewhere
    write_table7(gpu, tmp_path / "gpu_table")
    with pytest.raises(UserError, match="one table holds one setup"):
        run_table7(tmp_path / "gpu_table", CPU, measure_fn=FakeMeasure())
    paths = run_table7(tmp_path / "merged", sources=[tmp_path / "gpu.json", tmp_path / "gpu_table" / "table7.json"])
    assert "NVIDIA H100" in paths[1].read_text()


def test_bad_results_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"model": "rs50"}]')
    with pytest.raises(UserError, match="bad.json: not a latency result"):
        run_table7(tmp_path / "out", sources=[tmp_path / "bad.json"])
    with pytest.raises(UserError, match="missing.json: no such file"):
        run_table7(tmp_path / "out", sources=[tmp_path / "missing.json"])


def test_a_scaling_study_joins_the_table_and_the_pareto_plot(tmp_path):
    """A finished study written by hand (the scaling.json of `scale report`): its ResNet-RS and EfficientNet-RS
    points are their own rows and plot series, beside the paper's."""
    study = tmp_path / "study"
    study.mkdir()
    point = {"depth": None, "width": None, "dropout": 0.2, "randaugment_magnitude": 10, "stochastic_depth": 0.2,
             "label_smoothing": 0.1, "weight_decay": 1e-5, "config": "c.yaml", "params_m": 5.3}
    points = [{**point, "model": "efficientnet_b0", "resolution": 192, "epochs": 350, "top1": 0.765,
               "latency_s_per_128": 0.42, "gflops": 0.29},
              {**point, "model": "rs50-w1", "depth": 50, "width": 1.0, "resolution": 160, "epochs": 350,
               "top1": 0.781, "latency_s_per_128": 0.55, "gflops": 4.6}]
    (study / "scaling.json").write_text(json.dumps({"latency_source": "the run's training throughput",
                                                    "finished": 2, "planned": 2, "points": points}))
    fake = FakeMeasure()
    only = [s for s in table7_specs() if str(s) in ("rs50@160", "efficientnet_b0@224")]
    paths = run_table7(tmp_path / "out", CPU, only=only, study=study, measure_fn=fake)
    data = json.loads(paths[0].read_text())
    assert data["study"]["latency_source"] == "the run's training throughput"
    assert [(p["family"], p["model"], p["top1_measured"], p["s_per_128"]) for p in data["study"]["points"]] == [
        ("EfficientNet-RS", "efficientnet_b0", pytest.approx(76.5), 0.42),
        ("ResNet-RS", "rs50-w1", pytest.approx(78.1), 0.55)]
    assert len(data["rows"]) == 19  # the paper's rows are all still there
    md = paths[1].read_text()
    assert "## Scaling study measured here" in md
    assert "| EfficientNet-RS | efficientnet_b0 | 192 | 350 | 76.5 | 0.42 | 0.29 |" in md
    assert "| ResNet-RS | rs50-w1 | 160 | 350 | 78.1 | 0.55 | 4.6 |" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rendering saved results takes the study too; a folder without a report is one clear error
    assert "rs50-w1" in run_table7(tmp_path / "again", sources=[paths[0]], study=study)[1].read_text()
    with pytest.raises(UserError, match="scaling.json: no such file.*scale report"):
        run_table7(tmp_path / "out", CPU, only=only, study=tmp_path, measure_fn=fake)
    (study / "scaling.json").write_text('{"points": [{"model": "rs50"}]}')
    with pytest.raises(UserError, match="not a scaling report"):
        run_table7(tmp_path / "out", CPU, only=only, study=study, measure_fn=fake)
