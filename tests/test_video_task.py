"""The video task without training: the 30-view evaluator, config checks, the Table 6 ladder, `reproduce table6`."""

import errno
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rs_transfer.config import ConfigError, load_config, to_dict
from rs_transfer.cli import main
from rs_transfer.reproduce.table6 import TABLE6, config_path
from rs_transfer.video import data, synthetic
from rs_transfer.engine.classification import Classifier
from rs_transfer.video.config import VideoConfig, VideoDataConfig
from rs_transfer.video.task import VideoEvaluator, build_net, build_task, evaluate_videos

# PAPER.md section 6, verbatim.
PAPER_TABLE6 = ("Top-1: baseline (200 epochs, cosine) 73.4; + FC dropout 74.4; + label smoothing 74.9; + stochastic "
                "depth 76.1; + EMA 76.1; + weight decay 4e-5 76.3; + 350 epochs 76.4; + scale jittering 77.4; + SE "
                "77.9; + ResNet-D 78.2.")


class FixedLogits(nn.Module):
    """Always prefers class 0 and counts the views it is shown."""

    def __init__(self, num_classes):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(num_classes, 0, -1, dtype=torch.float32))
        self.views = 0

    def forward(self, x):
        assert x.shape[1:] == (3, 8, 32, 32)
        self.views += x.shape[0]
        return self.bias.expand(x.shape[0], -1)


def test_evaluator_averages_views_per_video_and_skips_broken_ones(tmp_path, caplog):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 2}, num_frames=20)
    videos, classes = data.list_videos(root, "val")
    broken = root / "val" / classes[0] / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    videos.append(data.Video(broken, 0))
    d = VideoDataConfig(num_workers=0, clip_frames=8, frame_stride=2, eval_short_side=32, eval_crop_size=32,
                        eval_views=30, eval_batch_views=7)
    net = FixedLogits(len(classes))
    metrics = evaluate_videos(Classifier(net).eval(), videos, d, len(classes))
    assert metrics == {"top1": 0.25, "top5": 1.0, "videos": 8.0, "skipped": 1.0}
    assert net.views == 8 * 30
    assert f"skipping video {broken}" in caplog.text


def test_evaluator_keeps_its_decoding_workers_between_evaluations(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=8)
    videos, classes = data.list_videos(root, "val")
    d = VideoDataConfig(num_workers=1, clip_frames=8, frame_stride=1, eval_short_side=32, eval_crop_size=32,
                        eval_views=1)
    evaluate = VideoEvaluator(videos, d, len(classes))
    model = Classifier(FixedLogits(len(classes))).eval()
    first = evaluate(model)
    workers = [w.pid for w in evaluate.loader._iterator._workers]
    assert evaluate(model) == first == {"top1": 0.25, "top5": 1.0, "videos": 4.0, "skipped": 0.0}
    assert [w.pid for w in evaluate.loader._iterator._workers] == workers and len(workers) == 1
    processes = evaluate.loader._iterator._workers
    evaluate.close()
    assert evaluate.loader is None and not any(w.is_alive() for w in processes)


def test_class_count_and_config_typos_are_named(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "csv", {"train": 1, "val": 1}, num_frames=8)
    config = load_config(VideoConfig, None, [f"data.root={root}", "model.name=rs26-w0.25", "model.num_classes=400"])
    with pytest.raises(ConfigError, match="model.num_classes=400 but .* has 4 training classes"):
        build_task(config)
    with pytest.raises(ConfigError, match="did you mean 'data.scale_jitter'"):
        load_config(VideoConfig, None, ["data.scale_jiter=false"])
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_task(load_config(VideoConfig))


def test_table6_numbers_match_the_paper():
    numbers = [float(x) for x in re.findall(r" (\d+\.\d)(?:;|\.$)", PAPER_TABLE6)]
    assert numbers == [row.paper for row in TABLE6]


# What each Table 6 row changes relative to the previous one (besides its output folder).
ROW_CHANGES = {
    "02_fc_dropout": {"model.drop_rate": 0.5},
    "03_label_smoothing": {"train.label_smoothing": 0.1},
    "04_stochastic_depth": {"model.drop_path_rate": 0.1},
    "05_ema": {"train.ema_decay": 0.9999},
    "06_weight_decay": {"train.weight_decay": 4e-5},
    "07_350_epochs": {"train.epochs": 350, "train.eval_last_epochs": 10},
    "08_scale_jitter": {"data.scale_jitter": True},
    "09_se": {"model.name": "resnet50-se"},
    "10_resnet_d": {"model.name": "rs50", "model.temporal_kernels": "rs"},
}


def _flat(config) -> dict:
    return {f"{section}.{k}": v for section, values in to_dict(config).items() if isinstance(values, dict)
            for k, v in values.items()}


def test_table6_rows_each_change_one_thing():
    configs = [load_config(VideoConfig, config_path(row)) for row in TABLE6]
    first = configs[0]
    assert (first.model.name, first.model.temporal_kernels, first.train.epochs) == ("resnet50", "cvrl", 200)
    assert not first.data.scale_jitter and first.train.ema_decay is None and first.train.batch_size == 1024
    for row, previous, config in zip(TABLE6[1:], configs, configs[1:]):
        before, after = _flat(previous), _flat(config)
        changed = {k: after[k] for k in after if after[k] != before[k]}
        assert changed == ROW_CHANGES[row.key], row.key
        assert config.output_dir.endswith(row.key) and Path(config_path(row)).read_text().count("base:") == 1
    last = configs[-1]
    assert (last.model.drop_path_rate, last.train.label_smoothing, last.data.eval_views) == (0.1, 0.1, 30)


def test_reproduce_table6_collects_finished_rows(tmp_path):
    for key, top1 in (("01_baseline", 0.7), ("10_resnet_d", 0.775)):
        (tmp_path / "table6" / key).mkdir(parents=True)
        (tmp_path / "table6" / key / "final_metrics.json").write_text(json.dumps({"top1": top1, "top5": 0.9}))
    assert main(["reproduce", "table6", "--out", str(tmp_path)]) == 0  # collects only: no --run
    results = json.loads((tmp_path / "table6.json").read_text())
    assert [r["status"] for r in results] == ["done"] + ["not run"] * 8 + ["done"]
    table = (tmp_path / "table6.md").read_text()
    assert "| Baseline (200 epochs, cosine) | 73.4 | 70.0 | -3.4 |" in table
    assert "| + ResNet-D | 78.2 | 77.5 | -0.7 |" in table
    assert "| + SE | 77.9 | not run |" in table
    assert results[-1]["ours"] == 0.775
    assert main(["reproduce", "table9"]) == 2


def test_config_inflates_a_2d_checkpoint_file(tmp_path):
    from rs_transfer.models import create_model
    from rs_transfer.video.task import build_net

    model_2d = create_model("rs26-w0.25", num_classes=10)
    torch.save({"model": model_2d.state_dict()}, tmp_path / "rs26.pth")
    config = load_config(VideoConfig, None, ["model.name=rs26-w0.25", "model.num_classes=4",
                                             f"model.inflate_from={tmp_path / 'rs26.pth'}", "model.inflate=centre"])
    net = build_net(config)
    weight = net.layer3[0].conv1.weight  # kt = 3 in c4: the 2D kernel sits in the middle tap
    torch.testing.assert_close(weight[:, :, 1], model_2d.layer3[0].conv1.weight)
    assert weight[:, :, 0].abs().sum() == 0 and net.fc.weight.shape == (4, 512)
    config.model.weights = str(tmp_path / "rs26.pth")
    with pytest.raises(ConfigError, match="not both"):
        build_net(config)


def test_video_eval_into_an_unwritable_output_dir_is_one_error_line_and_keeps_the_metrics(tmp_path, monkeypatch,
                                                                                        capsys, caplog):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=8)
    tiny = ["model.name=rs26-w0.125", "data.num_workers=0", "data.clip_frames=8", "data.crop_size=32",
            "data.train_short_side=32", "data.eval_short_side=32", "data.eval_crop_size=32"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"data": {"root": str(root)}, "train": {"device": "cpu"}}))
    config = load_config(VideoConfig, config_file, tiny)
    config.model.num_classes = 4
    torch.save({"model": Classifier(build_net(config)).state_dict()}, tmp_path / "final.pt")
    full = tmp_path / "full_disk" / "eval"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as on a full disk (root ignores permission bits, so tests cannot use them)
        if self == full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    caplog.set_level(logging.INFO, logger="rs_transfer.video.run")
    code = main(["video", "eval", "--checkpoint", str(tmp_path / "final.pt"), "--views", "1", "--config",
                 str(config_file), *tiny, f"output_dir={full}"])
    assert code == 2
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot create output_dir {full}: No space left on device; the metrics: {{")
    assert json.loads(line.partition("; the metrics: ")[2])["videos"] == 4.0  # the evaluation is in the error line
    assert out == ""


@pytest.mark.parametrize("config", [{"task": {"name": "pascal_det"}, "model": {"name": "rs26-w0.25"}},
                                    {"augment": {}, "model": {"name": "rs26-w0.25"}}])
def test_video_eval_of_another_familys_run_names_the_family(tmp_path, capsys, config):
    # A transfer or pretraining run's checkpoint: its config.yaml is found beside it and must not be read as a
    # video config (that said "unknown key 'task.name'" or another key, as if the user had made a typo).
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "final.pt").write_bytes(b"")
    assert main(["video", "eval", "--checkpoint", str(tmp_path / "final.pt")]) == 2
    family = "transfer config (pascal_det)" if "task" in config else "pretrain config"
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'config.yaml'} is a {family}, not a video one: "
                                               f"evaluate the run with rs-transfer evaluate --run {tmp_path}")


def test_the_model_normalises_uint8_clips_as_the_loader_used_to():
    from torchvision.transforms.v2 import functional as TF

    from rs_transfer.video import sampling

    torch.manual_seed(0)
    config = load_config(VideoConfig, None, ["model.name=rs26-w0.125", "model.num_classes=4"])
    model = Classifier(build_net(config)).eval()
    clips = torch.randint(0, 256, (2, 3, 8, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 3])
    # What TrainAugment returned before: float / 255, normalised with the ImageNet statistics, on the CPU.
    old = TF.normalize(TF.to_dtype(clips.transpose(1, 2), torch.float32, scale=True), sampling.MEAN, sampling.STD)
    old = old.transpose(1, 2)
    torch.testing.assert_close(model.normalize(clips), old)
    with torch.no_grad():
        logits = model({"image": clips})  # eval mode: logits; train mode uses the same logits for its loss
        torch.testing.assert_close(logits, model.net(old))
        expected = torch.nn.functional.cross_entropy(model.net(old), labels)
        torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, labels), expected)


def test_evaluator_hands_the_net_normalised_float_views(tmp_path):
    root = synthetic.write_dataset(tmp_path / "k400", "folders", {"train": 1, "val": 1}, num_frames=12)
    videos, classes = data.list_videos(root, "val")
    seen = []

    class Recording(FixedLogits):
        def forward(self, x):
            seen.append(x)
            return super().forward(x)

    d = VideoDataConfig(num_workers=0, clip_frames=8, frame_stride=1, eval_short_side=32, eval_crop_size=32,
                        eval_views=1)
    evaluate_videos(Classifier(Recording(len(classes))).eval(), videos[:1], d, len(classes))
    (views,) = seen
    assert views.dtype == torch.float32 and views.min() < -1.5 and views.max() > 1.5  # normalised, not / 255 only
