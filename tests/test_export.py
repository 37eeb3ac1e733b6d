"""rs_transfer/export.py: ONNX (run back with ONNX Runtime), TorchScript and torch.export programs match PyTorch,
and an export that does not match is refused without leaving a file."""

import warnings

import pytest
import torch

from rs_transfer import export
from rs_transfer.models import create_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("rs26-w0.25", num_classes=10, init="timm").eval()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_every_format_reloads_and_matches_pytorch_on_other_inputs(net, fmt, tmp_path):
    out = tmp_path / f"net{export.FORMATS[fmt]}"
    result = export.export_module(net, torch.randn(2, 3, 64, 64), fmt, out)
    assert result.path == out and out.is_file() and result.max_abs_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp or side files left
    images = torch.randn(3, 3, 64, 64)  # another batch size: the batch dimension is dynamic (traced for torchscript)
    with torch.no_grad():
        expected = net(images)
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        elif fmt == "pt2":
            got = torch.export.load(str(out)).module()(images)
        else:
            with warnings.catch_warnings():  # torch.jit is deprecated; loading is what a TorchScript user does
                warnings.simplefilter("ignore", FutureWarning)
                got = torch.jit.load(str(out))(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_no_file(net, tmp_path, monkeypatch):
    def wrong(module, example):
        return b"not a model", lambda inputs: module(inputs) + 0.5

    monkeypatch.setitem(export._WRITERS, "pt2", wrong)
    with pytest.raises(export.ExportError, match=r"pt2 export differs from PyTorch by up to 0.5"):
        export.export_module(net, torch.randn(2, 3, 32, 32), "pt2", tmp_path / "net.pt2")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'"):
        export.export_module(net, torch.randn(1, 3, 32, 32), "tflite", tmp_path / "net.tflite")


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_nothing(net, tmp_path):
    # The temp file export writes points at /dev/full, whose every write fails with ENOSPC, as a full disk's does;
    # torch.jit's own C++ writer aborted the process there (exit -6) and left its temp file.
    import os

    from rs_transfer.files import FileWriteError, temp_path

    out = tmp_path / "net.ts"
    os.symlink("/dev/full", temp_path(out))
    with pytest.raises(FileWriteError, match=rf"^cannot write {out}: No space left on device"):
        export.export_module(net, torch.randn(2, 3, 32, 32), "torchscript", out)
    assert list(tmp_path.iterdir()) == []


def run_folder(folder, family: str, task: str | None, overrides: list):
    """A run folder as the engine leaves one (config.yaml + weights.pth of the exported network), without training:
    export only reads those two files."""
    from rs_transfer.config import load_config, packaged_configs, save_config
    from rs_transfer.downstream import finetune
    from rs_transfer.engine.task import exported_network
    from rs_transfer.families import declaration

    declared = declaration(family, task)
    schema, build_model = declared.config, declared.build_model
    if family == "transfer":
        config = finetune.make_config(task, config_path=packaged_configs() / "downstream" / f"{task}_demo.yaml",
                                      overrides=overrides)
    else:
        config = load_config(schema, packaged_configs() / family / "demo.yaml", overrides)
    save_config(config, folder)
    torch.manual_seed(0)
    torch.save(exported_network(build_model(config)).state_dict(), folder / "weights.pth")
    return folder


# (family, task, overrides, resolution, format): every family, and ONNX for a dense task
RUNS = [
    ("transfer", "cifar100", [], 32, "pt2"),
    ("transfer", "nyu_depth", [], 64, "pt2"),
    ("transfer", "pascal_seg", [], 64, "onnx"),
    ("transfer", "pascal_det", [], 64, "pt2"),
    ("pretrain", None, ["model.num_classes=4"], 32, "pt2"),
    ("video", None, ["model.num_classes=4"], 32, "pt2"),
]


@pytest.mark.parametrize("family,task,overrides,resolution,fmt", RUNS, ids=[r[1] or r[0] for r in RUNS])
def test_export_of_a_run_matches_the_runs_model(tmp_path, capsys, family, task, overrides, resolution, fmt):
    import json

    from rs_transfer.cli import main
    from rs_transfer.runs import load_run

    folder = run_folder(tmp_path / "run", family, task, [f"data.root={tmp_path / 'data'}", *overrides])
    assert main(["export", "--run", str(folder), "--format", fmt, "--resolution", str(resolution)]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1  # only the JSON result on stdout
    assert "[torch.onnx]" not in out + err  # the exporter's progress lines are not the user's business
    result = json.loads(out)
    assert result["path"] == str(folder / "export" / f"model{export.FORMATS[fmt]}") and result["max_abs_diff"] <= 1e-4
    model = load_run(folder).model
    torch.manual_seed(1)
    if task == "pascal_det":  # backbone + FPN on normalised images: five levels, P3 at stride 8
        images = torch.randn(2, 3, resolution, resolution)
        expected = tuple(model.detector.backbone(images).values())
        assert len(expected) == 5 and expected[0].shape[-1] == resolution // 8
    else:
        frames = (model_frames(folder),) if family == "video" else ()
        images = torch.randint(0, 256, (2, 3, *frames, resolution, resolution), dtype=torch.uint8)
        expected = (model({"image": images}),)
    with torch.no_grad():
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(result["path"], providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(x) for x in session.run(None, {"images": images.numpy()})]
        else:
            got = torch.export.load(result["path"]).module()(images)
            got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(expected)
    for have, want in zip(got, expected):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-4, rtol=1e-4)


def model_frames(folder) -> int:
    import yaml

    return yaml.safe_load((folder / "config.yaml").read_text())["data"]["clip_frames"]


def test_export_of_a_folder_that_is_not_a_finished_run_is_one_error_line(tmp_path, capsys):
    from rs_transfer.cli import main

    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("task: {name: cifar100}\n")
    for folder, message in ((tmp_path / "missing", "run folder not found"), (tmp_path / "unfinished", "no weights.pth")):
        assert main(["export", "--run", str(folder), "--format", "pt2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_export_into_an_existing_folder_writes_model_ext_there(tmp_path, capsys):
    import json

    from rs_transfer.cli import main

    folder = run_folder(tmp_path / "run", "transfer", "cifar100", [f"data.root={tmp_path / 'data'}"])
    (tmp_path / "exports").mkdir()
    assert main(["export", "--run", str(folder), "--format", "torchscript", "--resolution", "32",
                 "--out", str(tmp_path / "exports")]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # only the JSON result on stdout (the exporter's chatter on stderr)
    result = json.loads(out)
    assert result["path"] == str(tmp_path / "exports" / "model.ts") and (tmp_path / "exports" / "model.ts").is_file()
    # a folder that does not exist yet, said with a trailing slash: made, model.ts written in it (not a file "new")
    assert main(["export", "--run", str(folder), "--format", "torchscript", "--resolution", "32",
                 "--out", f"{tmp_path / 'new' / 'sub'}/"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(tmp_path / "new" / "sub" / "model.ts")
    (tmp_path / "a_file").write_text("x")
    assert main(["export", "--run", str(folder), "--format", "pt2", "--out", str(tmp_path / "a_file" / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and len(err.strip().splitlines()) == 1
