"""Two processes (ranks with torchrun's variables, gloo on CPU) train to the same weights as one process with the same
global batch."""

import json

import pytest
import torch

import engine_toy
from forked_ranks import run_ranks


@pytest.mark.slow  # trains twice: on two forked ranks (forked_ranks.py), then in this process
def test_two_process_ddp_matches_one_process(tmp_path):
    # No dropout, no noise, no BN: with per-sample randomness or per-process batch statistics the two runs would
    # differ by design, not by a bug. Two processes x 2 accumulation steps x 4 samples = one process x 16.
    common = ["train.epochs=2", "train.ema_decay=0.9", "train.warmup_steps=3", "--dropout", "0", "--noise", "0"]
    result = run_ranks(engine_toy.main, [str(tmp_path / "ddp"), *common, "train.grad_accum_steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        engine_toy.main([str(tmp_path / "single"), *common])
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)

    single = torch.load(tmp_path / "single" / "final.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    # Same samples in every step, so the same gradients up to float32 summation order: one process averages 16
    # per-sample gradients in one reduction, DDP averages two means of 8 (each of two accumulated halves of 4).
    # Each step differs by a few ulps; after 32 steps the largest weight difference measured was 1.2e-7 (weights
    # up to 0.9), so 1e-5 leaves room for other CPUs and BLAS builds. A wrong sampler shard, a missing gradient
    # average or an LR scaled by the wrong batch moves weights by more than 1e-2.
    for part in ("model", "ema"):
        for key, value in single[part].items():
            torch.testing.assert_close(ddp[part][key], value, rtol=1e-4, atol=1e-5, msg=f"{part} {key}")
    single_metrics = json.loads((tmp_path / "single" / "final_metrics.json").read_text())
    assert json.loads((tmp_path / "ddp" / "final_metrics.json").read_text()) == single_metrics
    # Only rank 0 writes: one train event per logged step, not one per process.
    events = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 32


def test_ddp_is_built_without_torchs_deprecation_warning(tmp_path):
    # torch >= 2.13 warns for broadcast_buffers (a FutureWarning every DDP run printed); the engine passes what this
    # torch calls it
    import warnings

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from rs_transfer.engine.trainer import NO_FORWARD_BUFFER_SYNC

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = DistributedDataParallel(nn.BatchNorm1d(3), **NO_FORWARD_BUFFER_SYNC)
        assert not getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers)
    finally:
        dist.destroy_process_group()
