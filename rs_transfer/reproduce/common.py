"""What every `reproduce` table shares: a row is a config plus the paper's number; a row's result is the
`final_metrics.json` its run wrote. Rows without one are trained when asked (`--run`), else marked "not run"."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rs_transfer.engine.distributed import is_main
from rs_transfer.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    key: str  # the config's file name without .yaml, and the run's folder name
    label: str
    paper: float  # the paper's number, in the table's unit


def collect(rows, runs_dir: Path, metric: str, train: Callable[[Row, Path], None] | None) -> list:
    """One result dict per row: the paper's number and ours (from RUNS_DIR/<row>/final_metrics.json)."""
    results = []
    for row in rows:
        run_dir = runs_dir / row.key
        metrics_file = run_dir / "final_metrics.json"
        if not metrics_file.is_file() and train is not None:
            log.info("training %s into %s", row.key, run_dir)
            train(row, run_dir)
        ours = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        results.append({
            "row": row.key, "label": row.label, "paper": row.paper, "run_dir": str(run_dir),
            "ours": None if ours is None else ours.get(metric), "metrics": ours,
            "status": "done" if ours is not None else "not run",
        })
    return results


def write_table(name: str, title: str, results: list, out: Path, unit: str, scale: float = 1.0) -> None:
    """OUT/NAME.md (paper vs ours) and OUT/NAME.json; `scale` turns our metric into the paper's unit."""
    if not is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"| row | paper {unit} | ours {unit} | difference | run |", "|---|---|---|---|---|"]
    for r in results:
        ours = "not run" if r["ours"] is None else f"{r['ours'] * scale:.1f}"
        diff = "" if r["ours"] is None else f"{r['ours'] * scale - r['paper']:+.1f}"
        lines.append(f"| {r['label']} | {r['paper']:.1f} | {ours} | {diff} | {r['run_dir']} |")
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    atomic_write_json(out / f"{name}.json", results)
    log.info("wrote %s and %s", out / f"{name}.md", out / f"{name}.json")
