"""docs/engine.md's torchrun and SLURM commands, run as written (CPU, gloo, two processes).

The commands are read from the doc's "Running" section, so the doc is the one copy: each is run by bash with its
variables set for a two-process CPU job (GPUS_PER_NODE, a free MASTER_PORT) and overrides appended at its end, as a
user adds theirs (a tiny model and dataset, train.device=cpu). SLURM is a fake `srun` (it starts --ntasks-per-node
copies of its command per node with the variables srun sets for a step's tasks) and a fake `scontrol show
hostnames` on PATH.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_toy import REPO, script_env
from rs_transfer.pretrain.synthetic import make_folder_dataset

DOC = REPO / "docs" / "engine.md"
# Each launcher command of the doc, by the start of its comment line, and how it is run here.
TEMPLATES = ("one node", "4 nodes", "(a)", "(b)")
# A job's or a launcher's variables that must not leak in from the machine running the tests.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "NNODES",
                      "HEAD_NODE", "JOB_ID")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PET_")

FAKE_SRUN = '''#!{python}
"""A fake srun: --ntasks-per-node copies of the command on each of SLURM_NNODES nodes (all this machine), with the
variables srun gives a step's tasks; exits with the first failure's code."""
import os, subprocess, sys

args, per_node = sys.argv[1:], 1
while args and args[0].startswith("--"):
    option, value = args[0], args[1]
    args = args[2:]
    if option == "--ntasks-per-node":
        per_node = int(value)
    elif option != "--gpus-per-task":
        sys.exit(f"fake srun: unknown option {{option}}")
nodes = int(os.environ["SLURM_NNODES"])
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node),
                                     "SLURM_NODEID": str(i // per_node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
                                     "SLURM_STEP_NUM_NODES": str(nodes)}})
         for i in range(nodes * per_node)]
codes = [task.wait() for task in tasks]
sys.exit(next((code for code in codes if code), 0))
'''
FAKE_SCONTROL = '''#!/bin/bash
# a fake `scontrol show hostnames LIST`: one host name a line (LIST is comma-separated here, no [1-4] ranges)
[ "$1 $2" = "show hostnames" ] || exit 2
tr ',' '\\n' <<< "$3"
'''


def doc_templates() -> dict[str, str]:
    """{comment line: the lines under it} of every bash block in docs/engine.md's "Running" section."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("\n## Running\n"):]
    section = section[:section.index("\n## ", 1)]
    templates = {}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        comment = None
        for line in block.splitlines():
            if line.startswith("# "):
                comment = line[2:]
                templates[comment] = ""
            elif comment is not None:
                templates[comment] += line + "\n"
    return templates


def template(start: str) -> str:
    [command] = [lines for comment, lines in doc_templates().items() if comment.startswith(start)]
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("launch") / "data", num_classes=2, train_per_class=4,
                               val_per_class=2, min_side=32, max_side=40)


def job_env(tmp_path: Path, **variables) -> dict:
    """This checkout's environment with no launcher variables but `variables`, and the fake srun and scontrol,
    python and torchrun (this interpreter's) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {key: value for key, value in script_env().items()
           if key not in LAUNCHER_VARIABLES and not key.startswith(LAUNCHER_PREFIXES)}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "OMP_NUM_THREADS": "1", **{key: str(value) for key, value in variables.items()}}


def tiny(data: Path, out: Path) -> str:
    """The overrides a test appends to a doc command: rs50_i160's recipe on a tiny model, dataset and run."""
    return " ".join(shlex.quote(item) for item in (
        "model.name=rs26-w0.25", "model.num_classes=2", "data.image_size=32", "data.num_workers=0",
        f"data.root={data}", f"output_dir={out}", "train.epochs=null", "train.steps=2", "train.batch_size=4",
        "train.warmup_epochs=0", "train.device=cpu"))


def run_bash(script: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_trained_on_two_processes(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final_metrics.json").is_file() and (out / "weights.pth").is_file()
    # A checkpoint keeps one random state per process: two processes trained, not one twice or one alone.
    [step] = (out / "checkpoints").glob("step_*.pt")
    assert len(torch.load(step, weights_only=True)["rng"]) == 2


def test_the_doc_lists_the_launcher_commands_these_tests_run():
    # A launcher command added to the doc without a test here fails: every one but the plain one-process command.
    launchers = [comment for comment in doc_templates() if not comment.startswith("one process")]
    assert sorted(launchers) == sorted(comment for comment in doc_templates()
                                       if comment.startswith(TEMPLATES)) and len(launchers) == len(TEMPLATES)
    assert all(template(start).rstrip().endswith("data.root=/data/imagenet") for start in TEMPLATES)


@pytest.mark.slow  # torchrun with two gloo processes
def test_one_node_torchrun_template_trains_on_two_processes(tmp_path, data):
    out = tmp_path / "run"
    result = run_bash(template("one node").rstrip() + " " + tiny(data, out), job_env(tmp_path, GPUS_PER_NODE=2),
                      tmp_path)
    assert_trained_on_two_processes(result, out)


def test_multi_node_torchrun_template_is_the_slurm_one_without_slurm(tmp_path):
    # Running it on two "nodes" costs what the SLURM (a) test below costs (two torchrun agents, about 35 s of CPU
    # here); that test runs the same torchrun command on two nodes, so this one checks the two agree word for word.
    def words(command: str) -> list[str]:
        return [word for word in command.split() if word != "\\"]  # line breaks do not count

    slurm = words(template("(a)"))
    plain = template("4 nodes").replace("${NNODES:-4}", "$SLURM_NNODES").replace("$JOB_ID", "$SLURM_JOB_ID")
    plain = plain.replace("$HEAD_NODE:", "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):")
    assert slurm[:3] == ["srun", "--ntasks-per-node", "1"] and slurm[3:] == words(plain)


@pytest.mark.slow  # fake srun starting two torchrun agents with one gloo process each
def test_slurm_torchrun_template_trains_on_two_processes(tmp_path, data):
    out = tmp_path / "run"
    # Two nodes of one GPU each: srun starts a torchrun agent per node, the agents meet at the head node (c10d).
    env = job_env(tmp_path, GPUS_PER_NODE=1, MASTER_PORT=free_port(), SLURM_JOB_ID=4242, SLURM_NNODES=2,
                  SLURM_NTASKS=2, SLURM_JOB_NODELIST="localhost,localhost")
    result = run_bash(template("(a)").rstrip() + " " + tiny(data, out), env, tmp_path)
    assert_trained_on_two_processes(result, out)


@pytest.mark.slow  # fake srun starting two gloo processes
def test_slurm_task_per_gpu_template_trains_on_two_processes_and_without_srun_stops_at_once(tmp_path, data):
    out = tmp_path / "run"
    env = job_env(tmp_path, GPUS_PER_NODE=2, MASTER_PORT=free_port(), SLURM_JOB_ID=4242, SLURM_NNODES=1,
                  SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_JOB_NODELIST="localhost")
    command = template("(b)").rstrip() + " " + tiny(data, out)
    assert_trained_on_two_processes(run_bash(command, env, tmp_path), out)

    # The same lines with the srun prefix left out (typed in the sbatch script or an salloc shell): SLURM says two
    # tasks, one process runs. An error within seconds, not a wait for the second process until the timeout.
    without_srun = re.sub(r"srun( --\S+ \S+)* \\\n\s*", "", command)
    assert "srun" not in without_srun and "python -m rs_transfer" in without_srun
    start = time.monotonic()
    result = run_bash(without_srun, env, tmp_path)
    assert result.returncode == 2 and "prefix it with `srun`" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 120
