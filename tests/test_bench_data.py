"""`rs-transfer bench data` (rs_transfer/bench/data.py): every pipeline reports a rate, and the DALI CPU pipeline
is measured and reported beside them."""

import json

from rs_transfer.bench import data as bench_data
from rs_transfer.cli import main
from rs_transfer.pretrain.synthetic import make_folder_dataset

SIZE = 48
JPEGS = bench_data.synthetic_jpegs(3, size=(120, 90))


def test_bench_data_reports_every_pipeline(tmp_path, capsys):
    make_folder_dataset(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    assert main(["bench", "data", "--images", str(tmp_path / "train"), "--count", "3", "--resolution", "32",
                 "--seconds", "0.05", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == f"3 images from {tmp_path / 'train'}"
    rates = result["images_per_cpu_s_per_worker"]
    assert set(rates) == {"rs-tf", "rs-tf-fast", "rs-timm", "timm", "decode", "crop", "crop-fast"}
    assert all(rate > 0 for rate in rates.values())
    assert 0 <= result["fast_decode"]["reduced_share"] <= 1


def test_bench_data_measures_the_dali_cpu_pipeline(capsys):
    cpu_rate, wall_rate = bench_data.measure_dali(JPEGS[:3], SIZE, 10.0, min_seconds=0.05, seed=0, batch_size=4)
    assert cpu_rate > 0 and wall_rate > 0
    result = {"source": "x", "mean_jpeg_kb": 1.0, "resolution": SIZE, "magnitude": 10.0, "cpu_count": 2,
              "load_average": 0.0, "images_per_cpu_s_per_worker": {"rs-tf": 1.0},
              "images_per_wall_s_per_worker": {"rs-tf": 1.0},
              "dali": {"version": "2.4.0", "threads": 1, "images_per_cpu_s": 12.5, "images_per_wall_s": 10.0}}
    bench_data.print_report(result, as_json=False)
    assert capsys.readouterr().out.splitlines()[-1].split()[:5] == ["dali-cpu", "12.5", "10.0", "DALI", "2.4.0,"]


def test_bench_data_dali_backend_reports_the_main_threads_cost_per_batch(capsys):
    from rs_transfer.cli import main

    assert main(["bench", "data", "--backend", "dali", "--count", "3", "--resolution", "32", "--seconds", "0.05",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    per_batch = result["main_thread_cpu_ms_per_batch"]
    assert set(per_batch) == {"main-thread feeder", "2 feeder processes"} and all(v > 0 for v in per_batch.values())
    assert result["feeder_cpu_us_per_sample"] > 0
