import argparse
import importlib
import json
import subprocess
import sys

import pytest

from rs_transfer.cli import main
from rs_transfer.models.resnet_rs import RELEASED, count_params_fast


def test_models_table_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, params in zip(RELEASED, ("35.69", "63.62", "86.62", "93.21", "129.86", "163.96", "191.89")):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert params in line and f"resnetrs{name[2:]}.tf_in1k" in line
    assert "3-8-36-3" in out and "resnet200-se" in out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["rs152"]["layout"] == "3-8-36-3"
    assert [p["resolution"] for p in rows["rs152"]["paper"]] == [192, 224, 256]
    assert rows["rs152"]["paper"][1]["top1"] == 82.8
    assert rows["resnet200-d"]["se"] is False and rows["resnet200-d"]["resnet_d"] is True
    assert rows["resnet152"]["params_m"] == 60.19


def test_info_measures_params_and_gflops(capsys):
    assert main(["info", "rs26-w0.25", "--resolution", "64", "--resolution", "32", "--json", "--num-classes", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == [2, 2, 2, 2] and info["width"] == 0.25
    assert info["feature_strides"] == [4, 8, 16, 32] and info["feature_channels"] == [64, 128, 256, 512]
    assert set(info["gflops"]) == {"64", "32"} and info["gflops"]["64"] > info["gflops"]["32"] > 0
    assert info["params_m"] == round(count_params_fast("rs26-w0.25", num_classes=10) / 1e6, 3)


def test_unknown_model_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "rs_transfer", "info", "rs27"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown depth 27 in model name 'rs27'; depths: [26, 50, 101, 152, 200, 270, 300, 350, 400, 420]"
    ]
    assert "Traceback" not in result.stderr


def test_help_and_a_bad_model_name_import_no_torch():
    # `rs-transfer info rs27` answered in 3.7 s when the name grammar lived beside the torch model code
    code = """
import sys
from rs_transfer.cli import main
for argv in (["models", "--help"], ["info", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(main(["info", "rs27"]), [name for name in ("torch", "timm", "fvcore") if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "2 []", result.stderr
    assert "usage: rs-transfer models" in result.stdout and "usage: rs-transfer info" in result.stdout


def leaf_handlers(parser):
    """(command words, handler) of every runnable (sub)command under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                yield from (((word, *words), run) for words, run in leaf_handlers(sub))
    if parser.get_default("run") is not None:
        yield (), parser.get_default("run")


def test_each_command_s_handler_sits_beside_its_parser():
    # cli.py held every handler 150-450 lines from its parser; now each module of cli.COMMANDS holds both
    from rs_transfer.cli import COMMANDS
    from rs_transfer.options import Parser

    seen = []
    for entry in COMMANDS:
        module, _, function = entry.partition(":")
        parser = Parser(prog="rs-transfer")
        getattr(importlib.import_module(module), function or "add_command")(parser.add_subparsers())
        handlers = list(leaf_handlers(parser))
        assert handlers, entry
        assert [(words, run.__module__) for words, run in handlers] == [(words, module) for words, _ in handlers]
        seen += [words for words, _ in handlers]
    assert len(seen) == 26 and ("bench", "video-data") in seen and ("scale", "suggest") in seen


def test_every_parser_imports_nothing_heavy():
    # `rs-transfer --help` starts in ~0.2 s: no parser module may import torch, numpy, PIL or the config system
    code = """
import sys
from rs_transfer.cli import build_parser
build_parser()
print([name for name in ("torch", "numpy", "PIL", "omegaconf", "yaml") if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_config_show_prints_the_resolved_config_and_names_mistakes(capsys):
    import yaml

    # pretraining and video resolve without torch (checked in the subprocess of the test above's kind)
    code = """
import sys
from rs_transfer.cli import main
code = main(["config", "show", "pretrain", "--config", "pretrain/demo.yaml", "train.lr=0.3"])
print(code, [name for name in ("torch", "timm") if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    shown, last = result.stdout.rsplit("\n", 2)[0], result.stdout.splitlines()[-1]
    assert last == "0 []", result.stderr
    assert yaml.safe_load(shown)["train"]["lr"] == 0.3
    assert main(["config", "show", "finetune", "--task", "pascal_seg", "--backbone", "rs152", "task.crop_size=64"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["model"]["name"], config["task"]["crop_size"], config["task"]["name"]) == ("rs152", 64, "pascal_seg")
    assert main(["config", "show", "video", "train", "--config", "video/demo.yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["clip_frames"] > 0
    assert main(["config", "show", "finetune", "--task", "pascal_seg", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["config", "show", "predict"]) == 2 and "give a training command" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train-everything"])
    assert exit.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_overrides_may_follow_options_and_other_leftovers_are_refused(monkeypatch, capsys):
    import rs_transfer.downstream.finetune as finetune

    seen = {}
    monkeypatch.setattr(finetune, "finetune", lambda task, backbone, weights, config, overrides, synthetic:
                        seen.update(overrides=overrides))
    assert main(["finetune", "--task", "cifar100", "data.root=/x", "--resume", "train.steps=2"]) == 0
    assert seen["overrides"] == ["data.root=/x", "train.steps=2", "train.resume=auto"]
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--task", "cifar100", "--resume", "--bogus"])
    assert exit.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_an_os_refusal_is_one_error_line_naming_the_path(monkeypatch, capsys):
    import errno
    import os

    import rs_transfer.downstream.finetune as finetune

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run")

    monkeypatch.setattr(finetune, "finetune", read_only)
    assert main(["finetune", "--task", "cifar100"]) == 2
    assert capsys.readouterr().err == "error: /mnt/ro/run: Read-only file system (errno EROFS)\n"


@pytest.mark.parametrize("args, message", [
    (["info", "rs50", "--resolution", "0"], "--resolution must be at least 1, got 0"),
    (["info", "rs50", "--resolution", "-5"], "--resolution must be at least 1, got -5"),
    (["info", "rs50", "--num-classes", "-1"], "--num-classes must be at least 1, got -1"),
    (["info", "rs50", "--num-classes", "ten"], "--num-classes must be a whole number >= 1, got 'ten'"),
    (["index", "/data", "--workers", "-2"], "--workers must be at least 1, got -2"),
    (["pseudo-label", "--teacher", "t.pt", "--images", "i", "--out", "o", "--threshold", "nan"],
     "--threshold must be a number in [0, 1], got 'nan'"),
    (["pseudo-label", "--teacher", "t.pt", "--images", "i", "--out", "o", "--image-size", "0"],
     "--image-size must be at least 1, got 0"),
    (["pseudo-label", "--teacher", "t.pt", "--images", "i", "--out", "o", "--max-batches", "0"],
     "--max-batches must be at least 1, got 0"),
    (["video", "eval", "--checkpoint", "c.pt", "--views", "0"], "--views must be at least 1, got 0"),
    (["export", "--run", "r", "--format", "onnx", "--resolution", "-1"], "--resolution must be at least 1, got -1"),
    (["reproduce", "table1", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["sweep", "--task", "cifar100", "--point", "-1"], "--point must be at least 0, got -1"),
    (["bench", "latency", "--models", "rs50@64", "--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["bench", "data", "--seconds", "0"], "--seconds must be a number > 0, got '0'"),
    (["bench", "data", "--magnitude", "inf"], "--magnitude must be a number >= 0, got 'inf'"),
    (["bench", "index", "--shards", "1"], "--shards must be at least 2, got 1"),
    (["bench", "video-data", "--workers", "0", "-1"], "--workers must be at least 0, got -1"),
    (["bench", "video-data", "--clips", "0"], "--clips must be at least 1, got 0"),
])
def test_a_nonsense_number_is_one_error_line_naming_the_option_before_any_work(args, message, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("args", [
    ["pseudo-label", "--teacher", "t.pt", "--images", "i", "--out", "{out}"],
    ["predict", "--run", "r", "--images", "i", "--out", "{out}"],
    ["export", "--run", "r", "--format", "onnx", "--out", "{out}"],
    ["reproduce", "table1", "--out", "{out}"],
    ["scale", "plan", "--out", "{out}"],
    ["scale", "run", "--study", "{out}"],
    ["scale", "report", "--study", "{out}"],
    ["bench", "table7", "--out", "{out}"],
    ["bench", "index", "--work-dir", "{out}"],
    ["demo", "--output", "{out}"],
    ["demo", "--data", "{out}"],
])
@pytest.mark.parametrize("control", ["\n", "\t", "\x1b"])
def test_a_control_character_in_an_output_path_is_one_error_line_naming_the_option(args, control, tmp_path,
                                                                                    monkeypatch, capsys):
    # A newline in a folder name: config.yaml read back folds it into a space (another folder), and every log
    # line naming the folder splits in two. Refused like a config value with one, before anything is written.
    monkeypatch.chdir(tmp_path)
    out = f"runs/a{control}b"
    option = args[args.index("{out}") - 1]
    assert main([arg.format(out=out) for arg in args]) == 2
    assert capsys.readouterr().err == (f"error: {option} {out!r} holds a control character (a newline, tab, ...): "
                                       "a path is one line of printable text\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message, command", [
    (["finetune", "--task", "nosuch"], "argument --task: invalid choice: 'nosuch' (choose from ", "finetune"),
    (["finetune", "--task", "cifar100", "--bogus"], "unrecognized arguments: --bogus", "finetune"),
    (["video", "train"], "the following arguments are required: --config", "video train"),
    (["bench", "latency", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'", "bench latency"),
    ([], "the following arguments are required: COMMAND", ""),
])
def test_a_parser_error_is_one_line_pointing_at_the_commands_help(args, message, command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {message}") and err.endswith(f" (see rs-transfer {command} --help)\n".replace("  ", " ")), err


def test_help_is_argparses_own(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "--help"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("usage: rs-transfer finetune [-h] --task")


@pytest.mark.parametrize("args, what", [
    (["reproduce", "table1", "--out", "{file}/t"], "the table folder {file}/t"),
    (["finetune", "--task", "cifar100", "--synthetic", "output_dir={file}"],
     "the folder that holds the generated dataset {file}"),
    (["demo", "--task", "cifar100", "--output", "{file}/run", "--data", "{file}/data"],
     "the folder that holds the generated dataset {file}"),
])
def test_a_file_where_a_folder_goes_is_named_as_such(args, what, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    assert main([arg.format(file=file) for arg in args]) == 2
    assert capsys.readouterr().err == f"error: cannot create {what.format(file=file)}: {file} is a file, not a folder\n"


def test_save_config_makes_its_folder_the_one_way(tmp_path):
    from rs_transfer.config import RunConfig, save_config
    from rs_transfer.files import FileWriteError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileWriteError, match=f"^cannot create output_dir {tmp_path}/a-file/run: {tmp_path}/a-file is a"):
        save_config(RunConfig(), tmp_path / "a-file" / "run")


def test_a_config_of_another_task_is_refused_naming_both(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("task:\n  name: cifar100\ntrain:\n  steps: 3\n")
    assert main(["finetune", "--task", "pascal_seg", "--config", str(config), f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (f"error: config file {config} has task.name: cifar100, which contradicts --task "
                                       "pascal_seg: give a config of pascal_seg, or --task cifar100\n")
    assert main(["finetune", "--task", "pascal_seg", "task.name=cifar100"]) == 2
    assert capsys.readouterr().err == "error: override task.name=cifar100 contradicts --task pascal_seg\n"


def test_ctrl_c_before_the_first_step_is_one_stopped_line_and_exit_130(monkeypatch, capsys):
    # Ctrl-C while torch was imported or rs152 built (minutes on a loaded CPU) printed a 40-line traceback
    import rs_transfer.downstream.finetune as finetune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "finetune", interrupted)
    assert main(["finetune", "--task", "cifar100"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "stopped: Ctrl-C (outside a training run's steps: no checkpoint written)"]


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    # `rs-transfer scale plan --dry-run --json | head`: the pipe closes after a few bytes; Python's own advice
    # (signal docs, "Note on SIGPIPE"), not an `error: Broken pipe` line
    done = subprocess.run(f"{sys.executable} -m rs_transfer scale plan --dry-run --json | head -c 10",
                          shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.startswith("[") and len(done.stdout) == 10 and done.stderr == ""
