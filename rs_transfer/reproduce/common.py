"""What every `reproduce` table shares: the one writer of TABLE.json / TABLE.md (and a table's figures), and the
ladder tables' rows (a config plus the paper's number) whose result is the `final_metrics.json` its run wrote.
Rows without one are trained when asked (`--run`), else marked "not run"."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rs_transfer.engine.distributed import is_main
from rs_transfer.files import atomic_open, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def write_table(out: str | Path, name: str, markdown: str, document, figures: dict | None = None) -> list:
    """Write OUT/NAME.json (`document`), OUT/NAME.md (`markdown`) and each of `figures` (file name -> matplotlib
    Figure, saved at its own dpi); returns their paths in that order.

    Every file is written atomically, so a run killed mid-write keeps the previous table whole. Every rank
    computes the same table; only the main rank writes it.
    """
    out = Path(out)
    figures = figures or {}
    paths = [out / f"{name}.json", out / f"{name}.md", *(out / file_name for file_name in figures)]
    if not is_main():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(paths[0], document)
    atomic_write_text(paths[1], markdown)
    for path, figure in zip(paths[2:], figures.values()):
        with atomic_open(path, "wb") as file:
            figure.savefig(file, format=path.suffix[1:], dpi=figure.dpi)
    return paths


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


def ladder_markdown(title: str, results: list, unit: str, scale: float = 1.0) -> str:
    """A ladder's rows, paper vs ours; `scale` turns our metric into the paper's unit."""
    lines = [f"# {title}", "", f"| row | paper {unit} | ours {unit} | difference | run |", "|---|---|---|---|---|"]
    for r in results:
        ours = "not run" if r["ours"] is None else f"{r['ours'] * scale:.1f}"
        diff = "" if r["ours"] is None else f"{r['ours'] * scale - r['paper']:+.1f}"
        lines.append(f"| {r['label']} | {r['paper']:.1f} | {ours} | {diff} | {r['run_dir']} |")
    return "\n".join(lines) + "\n"
