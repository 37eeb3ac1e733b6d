"""Every dense evaluator (segmentation, depth, detection) on tiny synthetic data in its real format, for the tests
that its metrics do not depend on task.eval_batch_size nor on the number of processes.

Random weights give some metrics of 0 (no box of a random detector overlaps an object), so each evaluation also
returns a digest of everything the model predicted (the sum of its outputs: logits, depth, boxes and scores), which
a lost, repeated or differently computed image changes.

Run as a script (`python tests/dense_eval_toy.py DATA_DIR OUT_JSON`, under torchrun) or as main([DATA_DIR, OUT_JSON])
on ranks forked by forked_ranks.run_ranks, it evaluates every CASE at batch 8 in one launch (one job for all tasks is
cheaper than one per task) and rank 0 writes {case: result}, the digest summed over the processes.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from rs_transfer.config import load_config
from rs_transfer.downstream import registry
from rs_transfer.downstream.finetune import default_config

# (case, task, overrides): each dense evaluator (segmentation.make_evaluator is pascal_seg's, ade_seg's and
# folder_seg's), segmentation through overlapping windows and depth through flip TTA; detection at 64 px (CPU time)
CASES = [("folder_seg", "folder_seg", []), ("nyu_depth", "nyu_depth", []),
         ("pascal_det", "pascal_det", ["task.det_eval_size=64"]), ("coco_det", "coco_det", ["task.det_eval_size=64"]),
         ("folder_seg+slide", "folder_seg", ["task.eval_mode=slide", "task.slide_crop=80", "task.slide_stride=64"]),
         ("nyu_depth+flip", "nyu_depth", ["task.tta=flip"])]
VAL_IMAGES = 5  # two processes get 2 and 3: uneven shards


def write_data(root: Path) -> None:
    for task in sorted({task for _, task, _ in CASES}):
        registry.get(task).write_synthetic(root / task, 2, VAL_IMAGES)


class Recorded(nn.Module):
    """The model, adding up (float64) what it returns in `digest`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.digest = 0.0

    def forward(self, batch):
        out = self.model(batch)
        tensors = [d[key] for d in out for key in ("boxes", "scores")] if isinstance(out, list) else [out]
        self.digest += sum(t.double().sum().item() for t in tensors)
        return out


def evaluate(root: Path, task: str, overrides: list, batch_size: int) -> dict:
    """{"metrics", "digest"} of the task's demo model (rs26-w0.25, seeded: the same weights in every process) on
    root/task; the digest is this process's."""
    config = load_config(registry.get(task).config, default_config(task, demo=True),
                         [f"task.name={task}", f"data.root={root / task}", "data.num_workers=0",
                          f"task.eval_batch_size={batch_size}", "task.fpn_channels=16", *overrides])
    torch.manual_seed(0)
    built = registry.get(task).build(config)
    model = Recorded(built.model).eval()
    return {"metrics": built.evaluate(model), "digest": model.digest}


def main(argv=None) -> None:
    from rs_transfer.engine.distributed import all_reduce_sum, cleanup, init_distributed, is_main

    data, out = map(Path, argv or sys.argv[1:])
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        results = {case: evaluate(data, task, overrides, 8) for case, task, overrides in CASES}
        for result in results.values():
            result["digest"] = all_reduce_sum(torch.tensor(result["digest"], dtype=torch.float64)).item()
        if is_main():
            out.write_text(json.dumps(results))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
