"""Milliseconds per EMA update of a zoo model on this machine's CPU: timm's ModelEmaV3 against engine.ema.Ema.

    OMP_NUM_THREADS=1 python tools/ema_update_time.py [--model rs50] [--updates 30]
"""

import argparse
import json
import time

import torch
from timm.utils import ModelEmaV3

from rs_transfer.engine.ema import Ema
from rs_transfer.models import create_model


def per_update_ms(ema, model, updates: int) -> float:
    ema.update(model, step=1)  # first call builds what is cached
    start = time.perf_counter()
    for step in range(updates):
        ema.update(model, step=step + 2)
    return (time.perf_counter() - start) / updates * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rs50")
    parser.add_argument("--updates", type=int, default=30)
    args = parser.parse_args()
    model = create_model(args.model, num_classes=1000, init="timm")
    timm_ms = per_update_ms(ModelEmaV3(model, decay=0.9999), model, args.updates)
    ours_ms = per_update_ms(Ema(model, 0.9999), model, args.updates)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "timm_ms": round(timm_ms, 2),
                      "ours_ms": round(ours_ms, 2)}))


if __name__ == "__main__":
    main()
