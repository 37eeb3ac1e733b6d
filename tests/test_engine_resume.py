"""Exact resume after SIGKILL, atomic checkpoint writes, and picking the checkpoint to resume from."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import engine_toy
from engine_toy import TOY, run_forked, same_weights, script_env
from rs_transfer.engine import checkpoint as ckpt


def run_script(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], env=script_env(), capture_output=True, text=True,
                          timeout=300, check=check)


@pytest.mark.slow  # trains three times (once killed, forked from this process)
def test_run_killed_mid_epoch_resumes_to_bitwise_the_same_weights(tmp_path, deterministic):
    # 256 samples, global batch 16 in 2 accumulation steps: 16 steps (32 fetches of 8) per epoch. BN buffers, EMA,
    # dropout and per-sample noise all draw on state that the checkpoint must restore.
    common = ["train.epochs=2", "train.grad_accum_steps=2", "train.checkpoint_every_steps=5",
              "train.ema_decay=0.9", "train.warmup_steps=3", "--bn"]
    engine_toy.main([str(tmp_path / "reference"), *common])

    killed = tmp_path / "killed"
    # Killed while fetching the second half of step 23's batch (in epoch 2): the newest checkpoint is step 20, or
    # step 16 when step 20's background write (checkpoint.BackgroundWriter) was still in flight.
    result = run_forked(killed, *common, "--kill-at", 16 * 22 + 12)
    assert result.returncode == -9, result.stderr
    files = ckpt.step_checkpoints(killed / "checkpoints")
    assert [f.name for f in files] in (["step_00000016.pt", "step_00000020.pt"], ["step_00000015.pt",
                                                                                  "step_00000016.pt"])
    newest = ckpt.load(files[-1])
    assert (newest["epoch"], newest["step_in_epoch"]) == ((1, 4) if newest["step"] == 20 else (1, 0))
    assert not (killed / "final.pt").exists()

    engine_toy.main([str(killed), *common, "train.resume=auto"])
    reference = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    resumed = torch.load(killed / "final.pt", weights_only=True)
    for part in ("model", "ema"):
        assert reference[part].keys() == resumed[part].keys()
        for key, value in reference[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (tmp_path / "reference" / "final_metrics.json").read_text())
    # The killed run logged steps 4..20; the resumed one drops nothing it keeps and repeats no step.
    events = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 32


@pytest.mark.slow  # trains twice (once stopped, forked from this process)
def test_sigterm_checkpoints_at_the_end_of_the_step_and_stops_with_a_resume_hint(tmp_path, deterministic):
    # Batch 16, log every 4 steps: SIGTERM while fetching step 6's batch; the run saves step 6 (not the next log
    # event's step 8) and stops.
    out = tmp_path / "run"
    result = run_forked(out, "--kill-at", 16 * 5 + 3, "--signal", "SIGTERM")
    assert result.returncode != 0
    assert "stopped: SIGTERM at step 6" in result.stderr and "train.resume=auto" in result.stderr
    assert [f.name for f in ckpt.step_checkpoints(out / "checkpoints")] == ["step_00000006.pt"]
    engine_toy.main([str(out), "train.resume=auto"])
    assert ckpt.load(out / "checkpoints" / "step_00000032.pt")["epoch"] == 2


def test_a_second_ctrl_c_quits_at_once_in_one_line(tmp_path):
    # Two SIGINTs while fetching step 6's batch: the first asks for a checkpoint at the end of the step, the second
    # quits before it, with exit 130, one line and no traceback; the checkpoint of step 4 stays whole, or, when its
    # background write was still in flight (abandoned, not waited for), the line names none and none is there.
    out = tmp_path / "run"
    result = run_forked(out, "--kill-at", 16 * 5 + 3, "--signal", "SIGINT", "--signal-times", 2,
                     "train.checkpoint_every_steps=4")
    assert result.returncode == 130, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped:")]
    files = ckpt.step_checkpoints(out / "checkpoints")
    assert [f.name for f in files] in ([], ["step_00000004.pt"])
    # the line names the last write that had completed when it was printed (the rename may land just after it)
    named = [f"stopped: Ctrl-C twice: quit without a checkpoint of this step (the last one: {where})"
             for where in ([files[0], "none yet"] if files else ["none yet"])]
    assert len(lines) == 1 and lines[0] in named
    assert "Traceback" not in result.stderr
    assert not files or ckpt.load(files[0])["step"] == 4


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "step_00000001.pt"
    script = f"""
import os, signal, torch
from rs_transfer.engine import checkpoint
checkpoint.atomic_save({{"step": 1, "w": torch.ones(1000)}}, {str(path)!r})

def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
checkpoint.atomic_save({{"step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
"""
    result = run_script("-c", script, check=False)
    assert result.returncode == -9, result.stderr
    state = ckpt.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    leftovers = list(tmp_path.glob(".*.tmp.*"))
    assert len(leftovers) == 1
    ckpt.prune(tmp_path, keep_last=2)
    assert not leftovers[0].exists() and path.exists()


def training_state(step: int) -> dict:
    return {key: {} for key in ckpt.TRAINING_KEYS} | {"step": step}


def test_resume_auto_takes_the_newest_readable_checkpoint(tmp_path, caplog):
    ckpt.atomic_save(training_state(3), ckpt.step_path(tmp_path, 3))
    ckpt.atomic_save(training_state(10), ckpt.step_path(tmp_path, 10))
    assert ckpt.find_resume("auto", tmp_path) == ckpt.step_path(tmp_path, 10)
    ckpt.step_path(tmp_path, 12).write_bytes(b"copied by hand, cut short")
    assert ckpt.find_resume("auto", tmp_path) == ckpt.step_path(tmp_path, 10)
    assert "step_00000012.pt" in caplog.text
    assert ckpt.find_resume("auto", tmp_path / "empty") is None
    assert ckpt.find_resume(None, tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="nothing.pt"):
        ckpt.find_resume(str(tmp_path / "nothing.pt"), tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    ckpt.atomic_save({"rng": ckpt.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_worker_augmentations_depend_only_on_seed_epoch_and_index():
    from torch.utils.data import DataLoader

    from rs_transfer.engine.sampling import RunSampler, SeededSamples

    data = engine_toy.Points(48, seed=1, noise=1.0)

    def samples(start: int, workers: int) -> torch.Tensor:
        sampler = RunSampler(data, num_replicas=1, rank=0, seed=0)
        sampler.start, sampler.count = (3, start), 48 - start
        loader = DataLoader(SeededSamples(data, seed=0), batch_size=8, sampler=sampler, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    whole = samples(0, workers=2)
    assert torch.equal(samples(16, workers=1), whole[16:])  # resumed at batch 2, another worker count
    assert torch.equal(samples(8, workers=0), whole[8:])  # and in the main process
    different_epoch = SeededSamples(data, seed=0)[(4, 0)][0]
    assert not torch.equal(different_epoch, SeededSamples(data, seed=0)[(3, 0)][0])


# CPU autocast computes in float16 in every torch we support (>= 2.9), so this is real fp16 with a GradScaler. The
# loss x1000 (the LR / 1000: the same updates) overflows float16 gradients at the first loss scales: the scaler skips
# the first steps (the first one included, which PyTorch's scheduler would warn about) and backs off to 128.
FP16 = ["train.amp=fp16", "train.lr=0.0016", "--loss-gain", "1000", "train.clip_grad_norm=1000",
        "train.grad_accum_steps=2", "train.ema_decay=0.9", "--bn"]


def test_fp16_run_stopped_and_resumed_ends_bitwise_where_the_uninterrupted_one_does(tmp_path, deterministic, caplog):
    caplog.set_level("INFO")
    engine_toy.main([str(tmp_path / "reference"), *FP16])
    events = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    skipped = [e["amp_skipped"] for e in events if e["kind"] == "train"]
    assert skipped[0] == 4 and sum(skipped) < len(skipped) * 4  # all of the first 4 steps skipped, not all steps
    assert "amp: fp16 (train.amp=fp16)" in caplog.text

    killed = tmp_path / "killed"
    # SIGTERM while fetching step 6's batch: the run checkpoints step 6 and stops.
    assert engine_toy.main([str(killed), *FP16, "--kill-at", str(16 * 5 + 3), "--signal", "SIGTERM"]) == 143
    state = ckpt.load(killed / "checkpoints" / "step_00000006.pt")
    assert state["scaler"]["scale"] == 1024.0 and state["scaler"]["_growth_tracker"] == 0
    (tmp_path / "float32" / "checkpoints").mkdir(parents=True)
    shutil.copy(killed / "checkpoints" / "step_00000006.pt", tmp_path / "float32" / "checkpoints")
    engine_toy.main([str(killed), *FP16, "train.resume=auto"])
    engine_toy.same_weights(tmp_path / "reference" / "final.pt", killed / "final.pt")
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (tmp_path / "reference" / "final_metrics.json").read_text())

    # A checkpoint without scaler state (from before fp16, or a bf16/float32 run) resumes with a fresh scaler, which
    # skips steps again: the run ends elsewhere, so the restored state above is what made it exact.
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    del state["scaler"]
    ckpt.atomic_save(state, old / "checkpoints" / "step_00000006.pt")
    engine_toy.main([str(old), *FP16, "train.resume=auto"])
    assert "fp16 starts a fresh scaler, loss scale 65536" in caplog.text
    reference = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)["model"]
    fresh = torch.load(old / "final.pt", weights_only=True)["model"]
    assert not all(torch.equal(value, fresh[key]) for key, value in reference.items())
    # train.amp may change on resume (a LOCATION_KEY): an fp16 checkpoint resumed in float32 leaves the scaler out.
    engine_toy.main([str(tmp_path / "float32"), *FP16, "train.amp=none", "train.resume=auto"])
    assert "was an fp16 run; this run is not, so its gradient scaler state is not used" in caplog.text
    assert "scaler" not in ckpt.load(tmp_path / "float32" / "checkpoints" / "step_00000032.pt")


# Runs engine_toy in a subprocess that SIGKILLs itself at a chosen moment: in the background writer thread after the
# Nth checkpoint's bytes are written but before the rename (training goes on meanwhile), or in the training thread
# during the Nth evaluation (its checkpoint's write just submitted: in flight).
KILLING_RUN = """
import os, signal, sys, threading
sys.path.insert(0, {tests!r})
import torch
import engine_toy
where, n = {where!r}, {n}
seen = [0]
real_save = torch.save

def save(obj, file, *args, **kwargs):
    real_save(obj, file, *args, **kwargs)
    if where == "write" and threading.current_thread().name == "checkpoint-writer" and "step" in obj:
        seen[0] += 1
        if seen[0] == n:  # the Nth step checkpoint, written but not yet renamed
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

real_make_evaluate = engine_toy.make_evaluate

def make_evaluate(val_set):
    evaluate = real_make_evaluate(val_set)
    def dying(model):
        if where == "eval":
            seen[0] += 1
        if where == "eval" and seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(model)
    return dying

torch.save, engine_toy.make_evaluate = save, make_evaluate
engine_toy.main(sys.argv[1:])
"""


@pytest.mark.slow  # launches Python processes that import torch
def test_asynchronous_checkpoints_killed_at_random_moments_resume_bitwise(tmp_path, deterministic):
    import random

    common = ["train.checkpoint_every_steps=5", "train.ema_decay=0.9", "--bn"]  # writes at 5 10 15 16 20 25 30 32
    engine_toy.main([str(tmp_path / "reference"), *common])
    killed = tmp_path / "killed"
    # One killed run (a process start costs seconds): a moment drawn anew each time, named in failure messages.
    chosen = random.choice([("write", n) for n in range(1, 8)] + [("eval", 1), ("eval", 2)])
    result = run_script("-c", KILLING_RUN.format(tests=str(TOY.parent), where=chosen[0], n=chosen[1]), killed,
                        *common, check=False)
    assert result.returncode == -9, (chosen, result.stderr[-2000:])
    assert not (killed / "final.pt").exists()
    engine_toy.main([str(killed), *common, "train.resume=auto"])
    same_weights(tmp_path / "reference" / "final.pt", killed / "final.pt")  # on failure: `chosen` is in the locals
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (tmp_path / "reference" / "final_metrics.json").read_text())
    events = [(e["kind"], e["step"]) for e in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())]
    reference = [(e["kind"], e["step"]) for e in
                 map(json.loads, (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines())]
    assert events == reference, chosen  # each evaluation logged once, no step twice
    best = ckpt.load(killed / "checkpoints" / "best.pt")
    assert best["best"] == best["metrics"]["accuracy"] and not best["eval_pending"]
    assert [p.name for p in (killed / "checkpoints").iterdir() if ".tmp." in p.name] == []
