"""Faults of a cluster job: stop signals to the whole process group, divergence, kills between files, refused
resumes, foreign or unreadable checkpoints, torn logs, full disks, and nonsense config values."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import engine_toy
from engine_toy import TOY, run_forked, script_env
from rs_transfer.config import ConfigError, RunConfig, load_config
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine.trainer import NonFiniteLossError
from rs_transfer.errors import UserError
from rs_transfer.files import FileWriteError


def run_group(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run in a new session, so a signal to 'the whole process group' reaches the run and not pytest."""
    return subprocess.run(args, env=script_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def final_weights(folder) -> dict:
    return torch.load(folder / "final.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


def all_finite(path) -> bool:
    state = torch.load(path, weights_only=True)
    return all(torch.isfinite(v).all() for part in ("model", "ema") if part in state
               for v in state[part].values() if v.is_floating_point())


WORKERS = ["data.num_workers=2", "train.ema_decay=0.9", "--bn"]


@pytest.mark.slow  # trains three times, forked from this process in a process group of their own
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path, stop):
    # SIGTERM: SLURM and torchrun; SIGINT: Ctrl-C in a terminal. Both reach the loader workers too.
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert run_forked(reference, *WORKERS).returncode == 0
    result = run_forked(stopped, *WORKERS, "--term-group-at-index", "100", "--group-signal", stop)
    # The worker that signalled the group and its sibling survive it; the main process saves and stops.
    assert "killed by signal" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode == 128 + signal.Signals[stop], result.stderr[-2000:]
    assert f"stopped: {stop} at step" in result.stderr
    assert len(ckpt.step_checkpoints(stopped / "checkpoints")) == 1 and not (stopped / "final.pt").exists()
    assert run_forked(stopped, *WORKERS, "train.resume=auto").returncode == 0
    assert_same_weights(final_weights(reference), final_weights(stopped))


# SIGUSR1 (`#SBATCH --signal=USR1@120`) kills a torchrun that does not handle it, leaving the ranks unsupervised:
# docs/engine.md's torchrun command adds it to --signals-to-handle, as here
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", TOY]


@pytest.mark.slow  # three two-process torchrun launches
def test_a_stop_signal_to_a_two_process_torchrun_group_saves_and_resumes_exactly(tmp_path):
    # SIGUSR1, the signal torchrun does not handle by default; its SIGTERM takes the same way through torchrun
    # (--signals-to-handle lists both) and through the ranks' one handler (the test above sends SIGTERM and SIGINT)
    torchrun, stop = TORCHRUN, "SIGUSR1"
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert run_group([*torchrun, reference, *WORKERS]).returncode == 0
    result = run_group([*torchrun, stopped, *WORKERS, "--term-group-at-index", "100", "--group-signal", stop])
    assert "killed by signal" not in result.stderr
    assert f"stopped: {stop} at step" in result.stderr, result.stderr[-3000:]
    saved = ckpt.step_checkpoints(stopped / "checkpoints")
    assert len(saved) == 1 and not (stopped / "final.pt").exists()
    assert len(ckpt.load(saved[0])["rng"]) == 2  # both ranks' random states were gathered into it
    resumed = run_group([*torchrun, stopped, *WORKERS, "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(reference), final_weights(stopped))


@pytest.mark.slow  # a two-process torchrun launch, restarted once
def test_a_torchrun_group_restarted_after_a_rank_was_killed_mid_collective_finishes(tmp_path):
    # torchrun --max-restarts keeps one rendezvous store for all its restarts: the restarted ranks must not read the
    # dead group's addresses from it (they then waited in gloo's connectFullMesh until the 30-minute timeout).
    # That the restarted group resumes exactly is the SIGUSR1 test's resume above (the same two processes).
    torchrun = [*TORCHRUN[:-1], "--max-restarts", "1", TOY]
    out = tmp_path / "run"
    # rank 1 dies at its 13th step (8 samples a step), while rank 0 waits for it in the step's all-reduce
    result = run_group([*torchrun, out, "train.checkpoint_every_steps=8", "--kill-at", str(8 * 12 + 3),
                        "--kill-rank", "1"], timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exitcode: -9" in result.stderr and (out / "final.pt").is_file()
    assert ckpt.load(out / "checkpoints" / "step_00000032.pt")["step"] == 32


def test_an_infinite_update_after_a_finite_loss_is_never_checkpointed(tmp_path, deterministic):
    # lr 3e38 on inputs of scale 100: the first step's loss is finite, its update overflows the weights.
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="the weights .* NaN or infinite .* no checkpoint was written"):
        engine_toy.main([str(out), "train.lr=3e38", "train.scale_lr=false", "train.checkpoint_every_steps=1",
                         "train.log_every_steps=1", "--noise", "100"])
    assert ckpt.step_checkpoints(out / "checkpoints") == [] and not (out / "checkpoints" / "best.pt").exists()


def test_a_diverging_run_names_a_last_good_checkpoint_whose_weights_are_finite(tmp_path, deterministic):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        engine_toy.main([str(out), "train.lr=1e3", "train.checkpoint_every_steps=1", "train.eval_every_steps=1",
                         "train.log_every_steps=1"])
    named = str(error.value).split("the last good checkpoint is ")[1].split(".pt")[0] + ".pt"
    assert all_finite(named)
    for path in [*ckpt.step_checkpoints(out / "checkpoints"), out / "checkpoints" / "best.pt"]:
        assert all_finite(path), path


def test_a_kill_between_the_step_checkpoint_and_best_pt_does_not_lose_best(tmp_path, deterministic, monkeypatch):
    # lr 0: every evaluation gives the same accuracy, so only the first one (step 16) is a new best. The run dies
    # on the second .pt file of that evaluation (best.pt's link renamed into place, after the step file, in the
    # background writer); the resumed run evaluates step 16 again and must end with best.pt and its result.
    out = tmp_path / "run"
    written = []
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def dying_replace(source, target):
        if str(target).endswith(".pt"):
            written.append(os.path.basename(target))
            if len(written) == 2:
                raise Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        engine_toy.main([str(out), "train.lr=0"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(written) == ["best.pt", "step_00000016.pt"]
    engine_toy.main([str(out), "train.lr=0", "train.resume=auto"])
    best = ckpt.load(out / "checkpoints" / "best.pt")
    assert best["step"] == 16 and best["best"] == best["metrics"]["accuracy"]


def test_a_refused_resume_leaves_config_yaml_and_names_every_changed_key(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    before = (out / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointError) as error:
        engine_toy.main([str(out), "train.epochs=2", "train.resume=auto", "train.lr=0.8", "train.momentum=0.5",
                         "train.weight_decay=0.001"])
    message = str(error.value)
    for expected in ("train.lr: 1.6 in the checkpoint, 0.8 now", "train.momentum: 0.9 in the checkpoint, 0.5 now",
                     "train.weight_decay: 0.0 in the checkpoint, 0.001 now"):
        assert expected in message
    assert "\n" not in message
    assert (out / "config.yaml").read_text() == before
    # Where things are and how often they are logged may change; the length may change (logged).
    engine_toy.main([str(out), "train.epochs=2", "train.resume=auto", "train.log_every_steps=8",
                     "data.num_workers=0"])
    assert ckpt.load(out / "checkpoints" / "step_00000032.pt")["epoch"] == 2


def test_resuming_from_weights_only_files_or_another_models_checkpoint_is_a_clear_error(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    torch.save(final_weights(out)["model"], tmp_path / "weights.pth")
    for weights_only in (out / "final.pt", tmp_path / "weights.pth"):
        with pytest.raises(ckpt.CheckpointError, match="is not a training checkpoint .* model.weights=PATH"):
            engine_toy.main([str(tmp_path / "other"), f"train.resume={weights_only}"])
    # A checkpoint of another model (a wider net, no config to compare): its weights do not fit.
    state = ckpt.load(out / "checkpoints" / "step_00000016.pt")
    state["model"] = {k: torch.cat([v, v]) for k, v in state["model"].items()}
    del state["config"]
    ckpt.atomic_save(state, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"foreign.pt does not fit this run's model: .*size mismatch"):
        engine_toy.main([str(tmp_path / "third"), f"train.resume={tmp_path / 'foreign.pt'}"])


def test_every_checkpoint_unreadable_is_an_error_not_a_fresh_start(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1", "train.checkpoint_every_steps=4"])
    for path in ckpt.step_checkpoints(out / "checkpoints"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 step checkpoints .* can be read"):
        engine_toy.main([str(out), "train.epochs=1", "train.resume=auto"])


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "step": 17, "lo')
    engine_toy.main([str(out), "train.epochs=2", "train.resume=auto"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"][-1] == 32


def full_disk_save(after_bytes: int, as_torch_does: bool):
    """A torch.save that writes some bytes and then fails the way a full disk does: an OSError, or (what torch's
    zip writer does) a RuntimeError raised while it handles the OSError."""
    def save(obj, file):
        file.write(b"x" * after_bytes)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            if as_torch_does:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6332800 vs 6332688")
            raise
    return save


@pytest.mark.parametrize("as_torch_does", [False, True])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_temp_file(tmp_path, deterministic,
                                                                                          monkeypatch, as_torch_does):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    previous = {name: (out / "checkpoints" / name).read_bytes() for name in ("step_00000016.pt", "best.pt")}
    monkeypatch.setattr(torch, "save", full_disk_save(1000, as_torch_does))
    with pytest.raises(FileWriteError, match=r"^cannot write .*/checkpoints/\S+\.pt: No space left on device"):
        engine_toy.main([str(out), "train.epochs=2", "train.resume=auto"])
    for name, content in previous.items():
        assert (out / "checkpoints" / name).read_bytes() == content
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir() if ".tmp." in p.name] == []


def test_temp_files_of_killed_final_writes_are_removed_by_the_next_run(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    for name in (".final.pt.tmp.99999999", ".weights.pth.tmp.99999999", ".final_metrics.json.tmp.99999999"):
        (out / name).write_bytes(b"half")
    engine_toy.main([str(out), "train.epochs=2", "train.resume=auto"])
    assert sorted(p.name for p in out.iterdir() if ".tmp." in p.name) == []


def test_an_unwritable_output_dir_is_one_error_naming_it(tmp_path, deterministic, monkeypatch):
    # The tests run as root, which ignores permission bits: the refusal is injected where the OS would make it.
    from pathlib import Path

    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if "readonly" in str(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(UserError, match=r"cannot create output_dir .*readonly/run: Permission denied"):
        engine_toy.main([str(tmp_path / "readonly" / "run")])


def test_a_per_process_batch_of_one_at_a_1x1_feature_map_is_a_config_error(tmp_path, deterministic):
    with pytest.raises(ConfigError, match=r"train.batch_size=1 leaves 1 sample\(s\) per process"):
        engine_toy.main([str(tmp_path / "run"), "train.batch_size=1", "--bn"])


@pytest.mark.parametrize("override,rule", [
    ("train.clip_grad_norm=-1", "> 0"), ("train.weight_decay=-0.1", ">= 0"), ("train.ema_decay=1.0", "in [0, 1)"),
    ("train.ema_decay=-0.5", "in [0, 1)"), ("train.steps=0", ">= 1"), ("train.epochs=-3", ">= 1"),
    ("train.warmup_epochs=-1", ">= 0"), ("data.num_workers=-1", ">= 0"), ("train.momentum=-0.9", "in [0, 1)"),
    ("train.lr=-0.1", ">= 0"), ("train.lr=nan", ">= 0"), ("model.drop_rate=1.0", "in [0, 1)"),
    ("train.label_smoothing=1.5", "in [0, 1)"), ("train.amp=fp8", "one of auto, bf16, fp16, none"),
    ("train.eval_last_epochs=-1", ">= 0"),
])
def test_nonsense_values_are_refused_where_they_are_declared(override, rule):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, [override])
    key = override.split("=")[0]
    assert str(error.value).startswith(f"{key}=") and str(error.value).endswith(f"it must be {rule}")


@pytest.mark.parametrize("override,rule", [
    ("data.image_size=0", ">= 1"), ("data.crop_min_area=1.5", "in (0, 1]"), ("data.crop_min_area=0", "in (0, 1]"),
    ("augment.magnitude=-1", ">= 0"),
    # a typo's extra zeros: an error naming the key, not a MemoryError or hours of allocation before step one
    ("data.image_size=1000000000", "<= 16384"), ("data.eval_image_size=20000", "<= 16384"),
    ("train.batch_size=10000000000", "<= 1048576"), ("train.steps=10000000000", "<= 1000000000"),
    ("train.epochs=100000000", "<= 1000000"), ("data.num_workers=100000", "<= 1024"),
])
def test_pretrain_values_are_refused_too(override, rule):
    from rs_transfer.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, None, [override])
    assert str(error.value).startswith(override.split("=")[0] + "=") and str(error.value).endswith(rule)


def test_the_cli_prints_an_exception_from_a_loader_worker_as_one_line(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    from rs_transfer.errors import one_line

    class Broken(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise UserError(f"cannot read image {tmp_path}/x.jpg: truncated file")

    with pytest.raises(UserError) as error:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(error.value)  # what torch hands over
    assert one_line(error.value) == f"cannot read image {tmp_path}/x.jpg: truncated file"


def test_json_outputs_refuse_nan_and_infinity_naming_the_key(tmp_path):
    from rs_transfer.files import atomic_write_json

    with pytest.raises(FileWriteError, match=r"final_metrics.json: 'abs_rel' = inf is not a finite number"):
        atomic_write_json(tmp_path / "final_metrics.json", {"delta1": 0.0, "abs_rel": float("inf")})
    assert not any(tmp_path.iterdir())


EVAL_UNDER_SIGTERM = """
import os, signal, sys
from pathlib import Path
import torch
from torch.utils.data import Dataset
from rs_transfer.engine.loader import eval_loader

marker = Path(sys.argv[1])
received = []
signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))

class Items(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        if index == 5 and not marker.exists():
            marker.touch()
            os.killpg(os.getpgid(0), signal.SIGTERM)
        return torch.tensor(index)

seen = torch.cat(list(eval_loader(Items(), batch_size=4, num_workers=2)))
print(sorted(seen.tolist()) == list(range(40)), received == [signal.SIGTERM])
"""


@pytest.mark.slow  # a Python process that imports torch
def test_evaluation_loader_workers_survive_a_sigterm_to_the_process_group(tmp_path):
    # The trainer notes the signal during evaluation and saves after it; the evaluation itself must finish.
    result = run_group([sys.executable, "-c", EVAL_UNDER_SIGTERM, str(tmp_path / "sent")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("schema,override,rule", [
    ("video", "data.clip_frames=0", ">= 1"), ("video", "data.jitter_min_area=0", "in (0, 1]"),
    ("video", "model.temporal_kernels=slowfast", "one of rs, cvrl"), ("finetune", "task.crop_size=1", ">= 32"),
    ("finetune", "task.scale_min=-0.5", "> 0"), ("finetune", "model.num_classes=0", ">= 1"),
    ("video", "data.clip_frames=100000", "<= 4096"), ("video", "data.eval_crop_size=50000", "<= 16384"),
    ("finetune", "task.crop_size=51200", "<= 16384"), ("finetune", "task.eval_batch_size=2000000", "<= 1048576"),
    ("finetune", "task.head_channels=1000000", "<= 65536"),
])
def test_task_sections_declare_their_ranges_too(schema, override, rule):
    from rs_transfer.downstream.pascal_seg import PascalSegConfig
    from rs_transfer.video.config import VideoConfig

    with pytest.raises(ConfigError) as error:
        load_config({"video": VideoConfig, "finetune": PascalSegConfig}[schema], None, [override])
    assert str(error.value).startswith(override.split("=")[0] + "=") and str(error.value).endswith(rule)


def test_a_failed_final_evaluation_keeps_the_training_and_resume_evaluates_it(tmp_path, deterministic, monkeypatch):
    # A validation file that cannot be read at the very end: the run is saved before it evaluates.
    reference, run = tmp_path / "reference", tmp_path / "run"
    engine_toy.main([str(reference), "train.eval_every_epochs=0"])
    real_make_evaluate = engine_toy.make_evaluate

    def failing_make_evaluate(val_set):
        def evaluate(model):
            raise UserError("cannot read image val/0042.jpg: truncated file")
        return evaluate

    monkeypatch.setattr(engine_toy, "make_evaluate", failing_make_evaluate)
    with pytest.raises(UserError, match=r"^cannot read image val/0042.jpg: truncated file \(evaluating step 32; "
                                        r"the training is saved in .*step_00000032.pt: .* --resume"):
        engine_toy.main([str(run), "train.eval_every_epochs=0"])
    monkeypatch.setattr(engine_toy, "make_evaluate", real_make_evaluate)
    engine_toy.main([str(run), "train.eval_every_epochs=0", "train.resume=auto"])
    assert_same_weights(final_weights(reference), final_weights(run))
    assert json.loads((run / "final_metrics.json").read_text()) == json.loads(
        (reference / "final_metrics.json").read_text())
    best = ckpt.load(run / "checkpoints" / "best.pt")
    assert best["step"] == 32 and not best["eval_pending"]


def test_loader_workers_or_none_give_the_same_run_so_a_resume_may_change_them(tmp_path, deterministic):
    # Per-sample noise and dropout: with no workers, augmentation and dropout share the main process's generators.
    engine_toy.main([str(tmp_path / "none"), "data.num_workers=0"])
    engine_toy.main([str(tmp_path / "two"), "data.num_workers=2"])
    assert_same_weights(final_weights(tmp_path / "none"), final_weights(tmp_path / "two"))
    switched = tmp_path / "switched"
    engine_toy.main([str(switched), "data.num_workers=0", "train.checkpoint_every_steps=8", "train.keep_last=0"])
    step_16 = switched / "checkpoints" / "step_00000016.pt"
    engine_toy.main([str(tmp_path / "resumed"), "data.num_workers=2", f"train.resume={step_16}"])
    assert_same_weights(final_weights(tmp_path / "none"), final_weights(tmp_path / "resumed"))


def test_a_resume_may_not_change_what_the_run_trains_on_even_through_an_eval_key(tmp_path):
    from rs_transfer.config import RESUME_MAY_CHANGE, run_differences, to_dict
    from rs_transfer.pretrain.config import PretrainConfig

    saved = to_dict(load_config(PretrainConfig, None, ["data.eval_split=val"]))
    now = to_dict(load_config(PretrainConfig, None, ["data.eval_split=minival", "data.eval_image_size=256",
                                                     "data.num_workers=1", "train.eval_every_steps=5"]))
    assert run_differences(saved, now, RESUME_MAY_CHANGE) == ["data.eval_split: 'val' in the checkpoint, 'minival' now"]


def test_a_resume_with_a_run_shorter_than_the_checkpoint_is_an_error(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=2"])
    with pytest.raises(ConfigError, match=r"the run is 20 steps long .*step_00000032.pt is at step 32"):
        engine_toy.main([str(out), "train.epochs=null", "train.steps=20", "train.resume=auto"])


@pytest.mark.parametrize("overrides,message", [
    (["task.scale_min=3"], "task.scale_min=3.0 and task.scale_max=2.0 make no sense together"),
    (["task.depth_min=20"], "task.depth_min=20.0 and task.depth_max=10.0 make no sense together"),
    (["task.scale_min=0.0001", "task.crop_size=64"], "scales images to less than one pixel"),
    (["data.jitter_min_area=0.9", "data.jitter_max_area=0.5"], "data.jitter_min_area=0.9 and data.jitter_max_area=0.5"),
])
def test_values_that_make_no_sense_together_are_refused(overrides, message):
    from rs_transfer.downstream.nyu_depth import NYUDepthConfig
    from rs_transfer.video.config import VideoConfig

    # nyu_depth's section has every relation a fine-tuning section declares (scale range, crop, depth range)
    with pytest.raises(ConfigError, match=message):
        load_config(VideoConfig if overrides[0].startswith("data.jitter") else NYUDepthConfig, None, overrides)


LOADER_ALIVE_AT_EXIT = """
import torch
from torch.utils.data import DataLoader
from rs_transfer.engine.loader import ignore_stop_signals

class Cycle:
    pass

kept = Cycle()  # a reference cycle keeps the iterator (and its workers) alive until the interpreter exits
kept.me, kept.batches = kept, iter(DataLoader(list(range(1000)), batch_size=2, num_workers=2,
                                             worker_init_fn=ignore_stop_signals))
next(kept.batches)
"""


@pytest.mark.slow  # a Python process that imports torch
def test_a_process_exits_although_workers_that_ignore_sigterm_are_still_alive(tmp_path):
    # multiprocessing stops daemonic children at exit with SIGTERM, which our workers ignore, and then joins them:
    # without engine.loader's exit handler this process never ends (a CI run hung on it for 300 s).
    result = subprocess.run([sys.executable, "-c", LOADER_ALIVE_AT_EXIT], env=script_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


SIGNAL_WHILE_WORKERS_START = """
import os, signal, sys, time
import torch
from rs_transfer.engine.loader import Loader, ignore_stop_signals

received = []
signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))

def slow_start(worker_id):  # widens the moment between a worker's fork and its worker_init_fn
    time.sleep(1.0)
    ignore_stop_signals(worker_id)

batches = iter(Loader(list(range(40)), batch_size=4, num_workers=2, worker_init_fn=slow_start))
os.killpg(os.getpgid(0), signal.SIGTERM)  # the workers are starting now
seen = torch.cat(list(batches))
print(sorted(seen.tolist()) == list(range(40)), received == [signal.SIGTERM])
"""


@pytest.mark.slow  # a Python process that imports torch
def test_a_stop_signal_while_loader_workers_start_does_not_kill_them(tmp_path):
    # The CI run that found this: a SIGTERM sent by one rank's worker reached the other rank while its workers
    # were still starting, and PyTorch's start-up handler killed them.
    result = run_group([sys.executable, "-c", SIGNAL_WHILE_WORKERS_START])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


def test_one_live_run_per_output_dir_and_a_killed_holder_leaves_no_stale_lock(tmp_path, deterministic):
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    before = sorted(p.name for p in out.rglob("*"))
    # a run still training there (an array job with a fixed folder, a resubmitted job), killed at the end
    with engine_toy.folder_held(out) as pid:
        for args in (["train.epochs=2", "train.resume=auto"], ["train.epochs=1", "seed=1"]):
            with pytest.raises(UserError, match=rf"output_dir {out} is in use by a live process \(host .*, pid "
                                                rf"{pid}, since .*\): wait for it to end, or use another folder"):
                engine_toy.main([str(out), *args])
        assert sorted(p.name for p in out.rglob("*")) == before  # the refused runs wrote and removed nothing
    engine_toy.main([str(out), "train.epochs=2", "train.resume=auto"])  # SIGKILLed holder: no stale lock
    assert ckpt.load(out / "checkpoints" / "step_00000032.pt")["epoch"] == 2


def flip_a_weight_bit(path) -> None:
    """Flip one bit inside the first tensor record of a torch.save zip, as a disk or a copy can."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 16)
    data = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(data[record.header_offset + i: record.header_offset + i + 2], "little")
                                 for i in (26, 28))
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_is_skipped_on_resume_and_a_flipped_weights_file_is_refused(tmp_path, deterministic,
                                                                                              caplog):
    from rs_transfer.models.weights import WeightsError, read_state_dict

    caplog.set_level("INFO")
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1", "train.checkpoint_every_steps=8"])
    straight = final_weights(out)
    older, newest = ckpt.step_checkpoints(out / "checkpoints")[-2:]
    flip_a_weight_bit(newest)
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {newest} is corrupted: .* fails its CRC-32 check"):
        ckpt.load(newest)  # torch.load alone would return the changed weights
    engine_toy.main([str(out), "train.epochs=1", "train.resume=auto", "train.checkpoint_every_steps=8"])
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(newest) in skipped[0] and "CRC-32" in skipped[0]
    assert any(f"resumed from {older}" in r.getMessage() for r in caplog.records)
    assert_same_weights(straight, final_weights(out))  # the steps after the older checkpoint trained again, exactly
    flip_a_weight_bit(out / "final.pt")
    with pytest.raises(WeightsError, match=rf"weights file {out / 'final.pt'} is corrupted"):
        read_state_dict(out / "final.pt")


def test_a_worker_group_that_torchrun_restarted_resumes_by_itself(tmp_path, deterministic, monkeypatch, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "run"
    engine_toy.main([str(out), "train.epochs=1"])
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoints of an earlier run"):
        engine_toy.main([str(out), "train.epochs=2"])  # a first start without --resume refuses them
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts, after a worker failed
    engine_toy.main([str(out), "train.epochs=2"])
    assert "torchrun restart 1: resuming" in caplog.text
    assert ckpt.load(out / "checkpoints" / "step_00000032.pt")["epoch"] == 2


def test_an_evaluation_whose_record_failed_is_logged_once_after_resume(tmp_path, deterministic, monkeypatch):
    # The disk fills between an evaluation (logged) and its record beside the checkpoint (written before it): the
    # error is raised at the next save, and the resume evaluates the step again without logging it twice.
    from rs_transfer.engine import trainer

    reference, run = tmp_path / "reference", tmp_path / "run"
    engine_toy.main([str(reference)])
    real_record = ckpt.record_evaluation
    records = []

    def full_disk_at_the_first_record(path, record, best):
        records.append(record["metrics_step"])
        if records == [16]:
            raise FileWriteError(f"cannot write {ckpt.record_path(path)}: No space left on device")
        real_record(path, record, best)

    monkeypatch.setattr(trainer.ckpt, "record_evaluation", full_disk_at_the_first_record)
    with pytest.raises(FileWriteError, match="No space left"):
        engine_toy.main([str(run)])
    monkeypatch.setattr(trainer.ckpt, "record_evaluation", real_record)
    assert ckpt.load(run / "checkpoints" / "step_00000016.pt")["eval_pending"]
    engine_toy.main([str(run), "train.resume=auto"])
    events = [(e["kind"], e["step"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    expected = [(e["kind"], e["step"]) for e in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())]
    assert events == expected and events.count(("eval", 16)) == 1
    assert_same_weights(final_weights(reference), final_weights(run))


def test_a_full_disk_under_tensorboard_is_one_error_naming_its_folder(tmp_path, deterministic, monkeypatch, capfd):
    # tensorboard writes from a thread: the disk's error there ended the thread with its own traceback
    from tensorboard.summary.writer import record_writer

    real_write, written = record_writer.RecordWriter.write, []

    def full_disk_after_some_events(self, data):  # the disk fills mid-run, under the writer thread
        written.append(data)
        if len(written) > 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk_after_some_events)
    out = tmp_path / "run"
    with pytest.raises(FileWriteError, match=rf"^cannot write TensorBoard events in {out / 'tensorboard'}: No space "
                                             r"left on device$"):
        engine_toy.main([str(out), "train.epochs=1", "train.log_every_steps=2"])
    assert "Traceback" not in capfd.readouterr().err
    assert [p.name for p in out.iterdir() if ".tmp." in p.name] == []


@pytest.mark.parametrize("field, bit, marked", [("external attributes", 0x10, "a folder"), ("flags", 0x1, "encrypted")])
def test_a_flipped_bit_in_a_zip_entry_the_crcs_do_not_cover_is_refused(tmp_path, field, bit, marked):
    # The directory entry's "folder" bit made torch load that tensor as zeros; its "encrypted" bit a traceback
    import zipfile

    from rs_transfer.models.weights import WeightsError, read_state_dict

    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.ones(4, 3, 1, 1)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist()]
    entries = [i for i in range(len(data) - 3) if data[i:i + 4] == b"PK\x01\x02"]  # central directory, in order
    entry = next(offset for offset, name in zip(entries, names) if name == "weights/data/0")
    data[entry + (38 if field == "external attributes" else 8)] ^= bit
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"weights file {path} is corrupted: its zip entry weights/data/0 is "
                                           rf"marked {marked}"):
        read_state_dict(path)


def test_a_killed_holders_forked_children_do_not_keep_its_folder(tmp_path):
    # DataLoader workers are forked from the run: with flock they kept a SIGKILLed run's lock until they exited
    from rs_transfer.files import folder_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfrom rs_transfer.files import folder_lock\n"
         f"with folder_lock({str(tmp_path)!r}, 'held'):\n    child = os.fork()\n    if child == 0:\n"
         "        time.sleep(60)\n        os._exit(0)\n    print(child, flush=True)\n    time.sleep(60)"],
        env=script_env(), stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        with folder_lock(tmp_path, "output_dir"):  # at once, while the forked child still lives
            os.kill(child, 0)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()
