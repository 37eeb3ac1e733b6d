"""The first answers of `rs-transfer finetune`: a mistake in a config key or value, the weights file or the data.root
layout is one `error:` line and exit 2, given before torch (nor torchvision, timm, torchmetrics, scipy) is imported,
which takes seconds, half a minute on a loaded machine. `sweep`, `demo` and `config show finetune` import none
either, nor do `pretrain` and `video train` for a config or weights mistake (they took 25-50 s on a loaded machine),
nor `evaluate` and `predict` given a folder that is not a run, nor `predict` given inputs that are not there
(7-15 s).

Every case runs in one fresh Python process (the CLI's `main` called once per case), which then reports what it
imported: the import cost is paid once, and any case that imports torch shows."""

import json
import subprocess
import sys

from rs_transfer.downstream import registry

TASKS = registry.names()
HEAVY = ("torch", "torchvision", "timm", "torchmetrics", "scipy")
# override -> what its one error line says (data.root=/nonexistent: each task names its own missing piece)
MISTAKES = {
    "train.lrr=3": "unknown key 'train.lrr'; did you mean 'train.lr'?",
    "task.eval_batch_sise=3": "unknown key 'task.eval_batch_sise'; did you mean 'task.eval_batch_size'?",
    "task.eval_batch_size=0": "task.eval_batch_size",
    "model.weights=/nonexistent.pth": "weights file not found: /nonexistent.pth",
    "data.root=/nonexistent": "/nonexistent",
    "output_dir=run": "data.root is not set",
}

SCRIPT = """
import contextlib, io, json, logging, os, sys

from rs_transfer.cli import main
from rs_transfer.downstream import registry

tasks, mistakes, heavy = (json.loads(arg) for arg in sys.argv[1:])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # before main's: its log lines stay out of the cases'


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return {"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()}


results = [call(["finetune", "--task", task, "--backbone", "rs50", mistake]) for task in tasks for mistake in mistakes]
results += [call(["config", "show", "finetune", "--task", task, "--backbone", "rs50", "train.lr=0.5"])
            for task in tasks]
results += [call(["sweep", "--task", task, "--backbone", "rs50", "--steps", "2", "data.root=/nonexistent"])
            for task in tasks]
results += [call(["demo", "--task", task, "--data", "data", "--output", "run", "train.lrr=3"]) for task in tasks]
# pretraining and video: the same config and weights mistakes (their data checks need torch, but for pretrain's split)
results += [call(["pretrain", "--config", "pretrain/demo.yaml", mistake]) for mistake in mistakes
            if not mistake.startswith("task.")]
results += [call(["video", "train", "--config", "video/demo.yaml", mistake]) for mistake in mistakes
            if mistake.startswith(("train.", "model."))]
# a finished run's commands, given a folder that is not there, or inputs that are not there
results += [call(["evaluate", "--run", "/nonexistent"]), call(["predict", "--run", "/nonexistent", "--images", "x",
                                                               "--out", "o"])]
os.makedirs("run")
for name, text in (("config.yaml", "task:\\n  name: folder_cls\\n"), ("weights.pth", "")):
    with open(os.path.join("run", name), "w") as file:
        file.write(text)
results += [call(["predict", "--run", "run", "--images", "/nonexistent", "--out", "o"])]
print(json.dumps({"results": results, "imported": [name for name in heavy if name in sys.modules]}))
"""


def wrong_answers(found: dict) -> list:
    """The cases of `found` (SCRIPT's report) that did not answer as they should: each with what it printed."""
    wrong = []
    for result in found["results"]:
        argv, lines = result["argv"], result["err"].strip().splitlines()
        if argv[0] == "config":
            right = result["code"] == 0 and "name: rs50" in result["out"] and "lr: 0.5" in result["out"]
        else:
            said = ("--images: not found: /nonexistent" if argv[:3] == ["predict", "--run", "run"]
                    else "run folder not found: /nonexistent" if argv[0] in ("evaluate", "predict")
                    else MISTAKES[argv[-1]])
            right = result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0]
        if not right:
            wrong.append(result)
    return wrong


def test_mistakes_are_one_error_line_before_torch_is_imported(tmp_path):
    # One test, one process for every case: pytest-xdist would run a module fixture once per worker
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TASKS), json.dumps(list(MISTAKES)),
                           json.dumps(HEAVY)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found["results"]) == len(TASKS) * (len(MISTAKES) + 3) + 4 + 2 + 3 >= 81
    assert wrong_answers(found) == []
    assert found["imported"] == []


def test_a_gpu_sized_step_on_a_cpu_is_said_before_the_first_step():
    # rs152's default pascal_seg step (64 x 512 px) on a 24 GB CPU machine grew past 18 GB and was killed in its
    # first step, the start block its last word; the engine's "this run needs N hours" comes after that step
    from rs_transfer.downstream.finetune import default_config, gpu_sized, make_config

    for task in TASKS:
        said = gpu_sized(make_config(task, "rs152"), cuda=False)
        assert said.startswith("a GPU-sized step on a CPU") and f"--config downstream/{task}_demo.yaml" in said
        assert gpu_sized(make_config(task, "rs152"), cuda=True) is None
        assert gpu_sized(make_config(task, config_path=default_config(task, demo=True)), cuda=False) is None
