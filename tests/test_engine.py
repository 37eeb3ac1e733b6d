"""The training loop end to end on a toy task (tests/engine_toy.py): learning, outputs, errors."""

import json
import os

import pytest
import torch

import engine_toy
from engine_toy import make_task, toy_config
from rs_transfer.config import ConfigError
from rs_transfer.engine import checkpoint as ckpt
from rs_transfer.engine.trainer import NonFiniteLossError, micro_batch_size, train
from rs_transfer.models.weights import load_weights, read_state_dict


def test_toy_task_learns_and_writes_its_outputs(tmp_path, caplog):
    caplog.set_level("INFO", logger="rs_transfer")
    config = toy_config(tmp_path, "train.epochs=4", "train.warmup_epochs=1", "train.ema_decay=0.99",
                        "train.keep_last=2")
    task = make_task()
    before = task.evaluate(task.model.eval())["accuracy"]
    metrics = train(config, task)
    # Before the first step, the start block says what will happen; the first step has a line of its own (printed,
    # not a metrics.jsonl event: the records below are what they were before it)
    said = [r.getMessage() for r in caplog.records]
    start = next(m for m in said if m.startswith("start:"))
    assert "device: CPU, 1 thread(s) per process (OMP_NUM_THREADS); 1 process(es)" in start
    assert "plan: 64 steps (4 epochs) of global batch 16 (16 per process x 1 process(es) x 1 accumulation)" in start
    assert "evaluation every 1 epoch(s), at the end" in start and f"output: {tmp_path}" in start
    assert "steps per epoch, 0 loader worker(s) per process (data.num_workers)" in start
    assert said.index(start) < next(i for i, m in enumerate(said) if m.startswith("step 1/64 loss "))

    assert before < 0.5 and metrics["accuracy"] > 0.85  # 4 classes: chance is 0.25
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == metrics
    assert (tmp_path / "config.yaml").read_text().count("ema_decay: 0.99") == 1
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["kind"] == "train"]
    eval_events = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in train_events] == list(range(4, 65, 4))  # 16 steps per epoch, log every 4
    assert [e["step"] for e in eval_events] == [16, 32, 48, 64]
    assert train_events[-1]["loss"] < train_events[0]["loss"]
    assert {"lr", "loss", "accuracy", "images_per_s", "epoch"} <= set(train_events[0])
    assert eval_events[-1]["accuracy"] == metrics["accuracy"]
    assert any((tmp_path / "tensorboard").iterdir())

    files = ckpt.step_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files] == ["step_00000048.pt", "step_00000064.pt"]  # keep_last=2
    state = torch.load(files[-1], weights_only=True)
    assert state["step"] == 64 and state["epoch"] == 4 and state["step_in_epoch"] == 0
    assert state["config"]["train"]["ema_decay"] == 0.99
    best = ckpt.load(tmp_path / "checkpoints" / "best.pt")  # with its evaluation's result, from best.eval.json
    assert best["metrics"]["accuracy"] == max(e["accuracy"] for e in eval_events) == best["best"]
    # The model zoo's loader reads the EMA weights of a training checkpoint, without `module.` prefixes and without
    # the task wrapper's `net.` (every key of the toy model has it).
    ema = read_state_dict(tmp_path / "final.pt")
    assert set(ema) == {key.removeprefix("net.") for key in task.model.state_dict()}
    assert torch.equal(ema["0.weight"], state["ema"]["net.0.weight"])
    # weights.pth: the network to export (`model.net`), EMA weights, its own key names; it loads strictly.
    exported = torch.load(tmp_path / "weights.pth", weights_only=True)
    assert set(exported) == set(task.model.net.state_dict())
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    load_weights(make_task().model.net, tmp_path / "weights.pth", new_classifier=False)



def test_the_start_block_says_only_the_evaluations_that_fall_inside_a_short_run(tmp_path, caplog):
    # a 2-step try of a recipe that evaluates every 2500 steps: "every 2500 steps" would promise what never happens
    caplog.set_level("INFO", logger="rs_transfer")
    config = toy_config(tmp_path, "train.epochs=null", "train.steps=2", "train.batch_size=256",
                        "train.eval_every_epochs=0", "train.eval_every_steps=2500", "train.warmup_steps=0")
    train(config, make_task())
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start:"))
    assert "256 training samples, 1 step per epoch," in start
    assert "evaluation at the end;" in start

def test_global_batch_must_split_over_processes_and_accumulation():
    assert micro_batch_size(256, 8, 2) == 16
    with pytest.raises(ConfigError, match=r"train.batch_size=100 .* 8 x 1 = 8"):
        micro_batch_size(100, 8, 1)


def test_batch_that_does_not_split_is_rejected_before_training(tmp_path):
    config = toy_config(tmp_path, "train.batch_size=15", "train.grad_accum_steps=2")
    with pytest.raises(ConfigError, match="train.batch_size=15"):
        train(config, make_task())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # 16 steps per epoch; checkpoints every 4 steps; the loss turns NaN at forward 11.
    config = toy_config(tmp_path, "train.checkpoint_every_steps=4", "train.log_every_steps=100")
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite before step 12 .*step_00000008.pt"):
        train(config, make_task(nan_at=11))
    files = ckpt.step_checkpoints(tmp_path / "checkpoints")
    assert [f.name for f in files] == ["step_00000004.pt", "step_00000008.pt"]
    state = ckpt.load(files[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class Images(torch.utils.data.Dataset):
    """8x8 images whose class is the colour channel that is brightest."""

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(5)
        self.y = torch.randint(0, 3, (n,), generator=generator)
        self.x = torch.rand(n, 3, 8, 8, generator=generator)
        self.x[torch.arange(n), self.y] += 0.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
                                       torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(8, 3))
        self.seen = []

    def forward(self, batch):
        self.seen.append((batch["image"].is_contiguous(memory_format=torch.channels_last),
                          torch.is_autocast_enabled("cpu")))
        logits = self.net(batch["image"])
        self.seen[-1] += (logits.dtype,)
        return {"loss": torch.nn.functional.cross_entropy(logits.float(), batch["label"])}


@pytest.mark.parametrize("amp, autocast, dtype", [("bf16", True, torch.bfloat16), ("fp16", True, torch.float16),
                                                  ("auto", False, torch.float32)])
def test_autocast_and_channels_last_on_cpu(tmp_path, amp, autocast, dtype):
    from rs_transfer.engine.distributed import all_reduce_sum
    from rs_transfer.engine.task import Task

    val = Images(64)

    def evaluate(model):
        logits = model.net(val.x.contiguous(memory_format=torch.channels_last))
        correct = all_reduce_sum(torch.tensor([(logits.argmax(1) == val.y).sum().item(), len(val.y)]))
        return {"accuracy": (correct[0] / correct[1]).item()}

    torch.manual_seed(0)
    model = ConvNet()
    task = Task(model=model, train_set=Images(256), evaluate=evaluate, primary_metric="accuracy")
    config = toy_config(tmp_path, f"train.amp={amp}", "train.channels_last=true", "train.epochs=3", "train.lr=3.2",
                        "train.ema_decay=0.9", "train.clip_grad_norm=5.0")
    metrics = train(config, task)
    assert set(model.seen) == {(True, autocast, dtype)}  # auto: no autocast on CPU
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert metrics["accuracy"] > 0.8  # 3 classes
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(e["grad_norm"] > 0 for e in events if e["kind"] == "train")
    # The gradient scaler's record: fp16 only (bf16 has float32's exponent range and needs none).
    assert all(("loss_scale" in e) == (amp == "fp16") for e in events if e["kind"] == "train")


def test_unknown_amp_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.amp"):
        train(toy_config(tmp_path, "train.amp=fp8"), make_task())


@pytest.mark.parametrize("device, native_bf16, expected", [
    ("cuda", True, ("bf16", "auto: this GPU has bf16")),
    ("cuda", False, ("fp16", "auto: this GPU has no native bf16")),  # V100, T4: bf16 would only be emulated
    ("cpu", None, ("none", "auto: float32 on cpu, where autocast is slower")),
])
def test_auto_amp_resolves_by_the_gpus_native_bf16(monkeypatch, device, native_bf16, expected):
    from contextlib import nullcontext

    from rs_transfer.engine.device import resolve_amp

    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or native_bf16)
    assert resolve_amp("auto", torch.device(device)) == expected
    assert asked == ([{"including_emulation": False}] if device == "cuda" else [])
    assert resolve_amp("fp16", torch.device(device)) == ("fp16", "train.amp=fp16")


def test_checkpoints_of_an_earlier_run_need_resume_or_a_new_output_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    ckpt.atomic_save({"step": 4}, ckpt.step_path(tmp_path / "checkpoints", 4))
    with pytest.raises(ckpt.CheckpointError, match="train.resume=auto"):
        train(toy_config(tmp_path), make_task())


def test_step_based_run_evaluates_every_n_steps_and_at_the_end(tmp_path):
    # 10 steps of batch 64 over 256 samples: 4 steps per epoch, so the run wraps around the data twice.
    config = toy_config(tmp_path, "train.epochs=null", "train.steps=10", "train.batch_size=64",
                        "train.eval_every_epochs=0", "train.eval_every_steps=4", "train.keep_last=0")
    train(config, make_task())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [4, 8, 10]
    assert [f.name for f in ckpt.step_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000004.pt", "step_00000008.pt", "step_00000010.pt"]  # keep_last=0 keeps them all
    state = ckpt.load(tmp_path / "checkpoints" / "step_00000010.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (2, 2)


def test_sparse_evaluation_writes_one_checkpoint_per_evaluation_and_best_pt_outlives_its_pruned_step(tmp_path,
                                                                                                       monkeypatch):
    # 5 epochs of 4 steps: every 2nd epoch and each of the last 2 (train.eval_last_epochs) -> epochs 2, 4, 5. lr 0:
    # every evaluation gives the same accuracy, so best.pt stays step 8, whose step file keep_last=1 deletes.
    written = []
    real_save = ckpt.atomic_save
    monkeypatch.setattr(ckpt, "atomic_save", lambda obj, path: (written.append(path.name), real_save(obj, path)))
    config = toy_config(tmp_path, "train.epochs=5", "train.batch_size=64", "train.eval_every_epochs=2",
                        "train.eval_last_epochs=2", "train.keep_last=1", "train.lr=0")
    train(config, make_task())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [8, 16, 20]
    assert written == ["step_00000008.pt", "step_00000016.pt", "step_00000020.pt", "final.pt", "weights.pth"]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.eval.json", "best.pt", "step_00000020.eval.json",
                                                         "step_00000020.pt"]
    best = ckpt.load(folder / "best.pt")
    assert (best["step"], best["best_step"], best["eval_pending"]) == (8, 8, False)
    assert best["best"] == best["metrics"]["accuracy"] == events[-1]["accuracy"]
    assert not ckpt.load(folder / "step_00000020.pt")["eval_pending"]  # its record: evaluated


@pytest.mark.parametrize("links", [True, False])
def test_best_pt_is_a_hard_link_or_where_there_are_none_a_copy(tmp_path, monkeypatch, links):
    step = ckpt.step_path(tmp_path, 8)
    ckpt.atomic_save({"w": torch.arange(4)}, step)
    ckpt.atomic_save({"old": torch.zeros(1)}, tmp_path / "best.pt")
    if not links:  # a file system without hard links (EPERM, as on FAT or some network mounts)
        monkeypatch.setattr(os, "link", lambda source, target: (_ for _ in ()).throw(PermissionError(1, "no links")))
    ckpt.atomic_link(step, tmp_path / "best.pt")
    assert os.path.samefile(step, tmp_path / "best.pt") == links
    step.unlink()  # pruned: best.pt keeps the content
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_report_best_ends_the_run_as_its_best_checkpoint_evaluated_by_report(tmp_path):
    # Early stopping as the paper does for RS-350/420 @ 320: pick on one split (minival), report on another (val).
    config = toy_config(tmp_path, "train.epochs=3", "train.eval_every_steps=4", "train.ema_decay=0.9",
                        "train.report_best=true")
    task = make_task()
    report_set = engine_toy.Points(64, seed=7, noise=0.0)
    task.report = engine_toy.make_evaluate(report_set)
    metrics = train(config, task)

    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["kind"] == "eval"]
    first_best = next(e for e in evals if e["accuracy"] == max(e["accuracy"] for e in evals))
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == first_best["step"] < 48 == evals[-1]["step"]  # the best is not the last step here
    last = torch.load(tmp_path / "checkpoints" / "step_00000048.pt", weights_only=True)
    assert not torch.equal(last["ema"]["net.0.weight"], best["ema"]["net.0.weight"])
    # final.pt and weights.pth are the best checkpoint's weights, not the last step's
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(final[part][key], value) for key, value in best[part].items()), part
    exported = torch.load(tmp_path / "weights.pth", weights_only=True)
    assert all(torch.equal(value, best["ema"][f"net.{key}"]) for key, value in exported.items())
    # the reported metrics: the best EMA weights evaluated by task.report (not by task.evaluate)
    net = make_task().model
    net.load_state_dict(best["ema"])
    expected = engine_toy.make_evaluate(report_set)(net.eval())
    assert metrics == expected == json.loads((tmp_path / "final_metrics.json").read_text())


def test_report_best_without_a_report_evaluator_reports_the_best_evaluation(tmp_path):
    config = toy_config(tmp_path, "train.epochs=3", "train.eval_every_steps=4", "train.ema_decay=0.9",
                        "train.report_best=true")
    metrics = train(config, make_task())
    best = ckpt.load(tmp_path / "checkpoints" / "best.pt")  # with its evaluation's result, from best.eval.json
    assert metrics == best["metrics"] == json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["accuracy"] == best["best"]


def test_channels_last_for_2d_and_3d_layers_and_nested_batches():
    from collections import namedtuple

    from rs_transfer.engine.device import to_channels_last, to_device

    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 1), torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(4, 2))
    to_channels_last(model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last)
    Pair = namedtuple("Pair", "clip mask")
    batch = {"images": [torch.rand(2, 3, 4, 4)], "pair": Pair(torch.rand(2, 3, 2, 4, 4), torch.zeros(2, 4, 4)),
             "name": "x"}
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert moved["images"][0].is_contiguous(memory_format=torch.channels_last)
    assert isinstance(moved["pair"], Pair) and moved["pair"].clip.is_contiguous(memory_format=torch.channels_last_3d)
    assert moved["pair"].mask.is_contiguous() and moved["name"] == "x"


class PidPoints(engine_toy.Points):
    """Toy samples that record which process loaded them."""

    def __init__(self, log_path, **kwargs):
        super().__init__(**kwargs)
        self.log_path = str(log_path)

    def __getitem__(self, i):
        with open(self.log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        return super().__getitem__(i)


def test_loader_workers_persist_across_epochs(tmp_path, deterministic):
    # Starting workers at every epoch costs seconds at scale (each re-imports and re-opens its data).
    task = engine_toy.make_task(n=64)
    task.train_set = PidPoints(tmp_path / "pids.txt", n=64, seed=1)
    train(engine_toy.toy_config(tmp_path / "run", "train.epochs=3", "data.num_workers=2"), task)
    pids = set((tmp_path / "pids.txt").read_text().split())
    assert len(pids) == 2 and str(os.getpid()) not in pids


def test_fp16_steps_the_scaler_skips_are_logged_not_a_divergence(tmp_path, caplog):
    # The loss x1e6 (finite; the LR / 1e6) overflows float16 gradients at any loss scale >= 1: the scaler skips steps
    # and halves the scale down to 1/8, where steps are taken again. The run goes on (no NonFiniteLossError) and the
    # log says what happened.
    caplog.set_level("INFO")
    task = make_task(loss_gain=1e6)
    train(toy_config(tmp_path, "train.amp=fp16", "train.lr=1.6e-6", "train.steps=24", "train.epochs=null"), task)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["amp_skipped"], e["loss_scale"]) for e in events if e["kind"] == "train"] == [
        (4, 4096), (4, 256), (4, 16), (4, 1), (3, 0.125), (0, 0.125)]
    assert "fp16: 3 step(s) skipped since the last log event and the loss scale fell to 0.125" in caplog.text
    assert caplog.text.count("the loss scale fell to") == 1  # not at the last event, which skipped none
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


def test_threads_on_a_cpu_leave_room_for_other_work(monkeypatch):
    from rs_transfer.engine.distributed import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert cpu_threads(1) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    for cores, load, local_world, threads in ((2, 2.3, 1, 1), (2, 0.2, 1, 2), (16, 0.4, 1, 16), (16, 0.4, 2, 8),
                                              (16, 12.0, 1, 4), (4, 9.0, 1, 1)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
        assert cpu_threads(local_world)[0] == threads, (cores, load, local_world)


def test_a_slow_run_prints_progress_between_log_events_without_changing_its_records(tmp_path, caplog):
    caplog.set_level("INFO", logger="rs_transfer")
    train(toy_config(tmp_path, "train.epochs=1", "train.log_every_seconds=1e-9"), make_task())
    steps = [int(m.split()[1].split("/")[0]) for m in (r.getMessage() for r in caplog.records)
             if m.startswith("step ") and "(this process)" in m]
    assert steps == [s for s in range(1, 17) if s % 4]  # every step that is not a log event
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == [4, 8, 12, 16]


def test_a_compiled_run_follows_the_eager_runs_losses(tmp_path):
    # train.compile through a backend that compiles without generating code (inductor takes minutes on a CPU):
    # the model's graph is captured and differentiated by torch.compile, and the run is the eager one's to round-off
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=aot_eager"])):
        train(toy_config(tmp_path / name, "train.epochs=1", *extra), make_task())
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [e["loss"] for e in events if e["kind"] == "train"]
    assert counters["stats"]["unique_graphs"] >= 1
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    torch._dynamo.reset()
