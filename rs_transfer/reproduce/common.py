"""What every `reproduce` table shares: the one writer of TABLE.json / TABLE.md (and a table's figures), and the
ladder tables (Tables 1, 2, 4 and 6): rows of a packaged config plus the paper's number, whose result is the
`final_metrics.json` each row's run wrote. Rows without one are trained when asked (`--run`), else marked
"not run"; `--repeats N` trains each row N times with seeds seed, seed+1, ... and reports the mean and the spread
(the paper averages Tables 1, 2 and 6 over 2 runs)."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rs_transfer.config import load_config, packaged_configs, string_override
from rs_transfer.engine.distributed import is_main
from rs_transfer.engine.summary import read_final_metrics
from rs_transfer.errors import UserError
from rs_transfer.files import atomic_open, atomic_write_json, atomic_write_text, make_dir

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
    make_dir(out, "the table folder")
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


@dataclass(frozen=True)
class Ladder:
    """A table whose rows are runs of packaged configs: rs_transfer/configs/CONFIGS/<row.key>.yaml."""

    name: str  # "table1": the file names TABLE.md / TABLE.json and the rows' folder OUT/TABLE/
    title: str
    rows: tuple  # of Row
    configs: str  # the packaged folder of the rows' configs, e.g. "pretrain/table1"
    metric: str  # the key in final_metrics.json, a fraction
    unit: str  # the paper's unit, e.g. "top-1 %"
    default_out: str  # where the rows' configs put their runs (their output_dir is DEFAULT_OUT/TABLE/<row>)
    schema: type  # the rows' config class, e.g. PretrainConfig
    train: Callable[[str, list], object]  # (config file, overrides) -> runs it, e.g. pretrain.run.pretrain

    def config(self, row: Row) -> Path:
        return packaged_configs().joinpath(*self.configs.split("/"), f"{row.key}.yaml")


def repeat_dir(runs_dir: Path, row: Row, repeat: int) -> Path:
    """Repeat 0 is RUNS_DIR/<row> (the configs' own output_dir); repeat i > 0 is RUNS_DIR/<row>-repeat<i>."""
    return runs_dir / (row.key if repeat == 0 else f"{row.key}-repeat{repeat}")


def reproduce_ladder(ladder: Ladder, out: str | None, run: bool, overrides: list, repeats: int = 1,
                     dry_run: bool = False) -> list:
    """Collect (and with `run`, train the missing runs of) every row of `ladder`, `repeats` runs each, and write
    OUT/TABLE.md and OUT/TABLE.json (OUT defaults to the configs' own run folder); returns the result rows.

    `dry_run` prints the runs (config, label, paper number, run folder) and writes nothing. Raises UserError for
    repeats < 1 and ConfigError for an override a row's config rejects (checked for every row before anything
    trains).
    """
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    runs_dir = Path(out or ladder.default_out) / ladder.name
    # Loading every row's config first rejects a bad override before anything trains.
    seeds = {row.key: load_config(ladder.schema, ladder.config(row), overrides).seed for row in ladder.rows}
    if dry_run:
        print(f"{'config':<48}{'row':<36}{'paper':>7}  run folder")
        for row in ladder.rows:
            config = ladder.config(row).relative_to(packaged_configs()).as_posix()
            folders = ", ".join(str(repeat_dir(runs_dir, row, i)) for i in range(repeats))
            print(f"{config:<48}{row.label:<36}{row.paper:>7.1f}  {folders}")
        print(f"\n{len(ladder.rows) * repeats} runs; train the missing ones with `rs-transfer reproduce "
              f"{ladder.name} --run data.root=DIR`")
        return []

    def train(row: Row, run_dir: Path, repeat: int) -> None:
        ladder.train(str(ladder.config(row)), [*overrides, string_override("output_dir", run_dir),
                                                   f"seed={seeds[row.key] + repeat}"])

    results = collect(ladder.rows, runs_dir, ladder.metric, train if run else None, repeats)
    markdown = ladder_markdown(ladder.title, results, ladder.unit, scale=100.0)
    json_path, md_path = write_table(out or ladder.default_out, ladder.name, markdown, results)
    if is_main():
        missing = sum(r["status"] != "done" for r in results)
        log.info("wrote %s and %s%s", md_path, json_path,
                 f"; {missing} rows not (fully) run: add --run to train them" if missing and not run else "")
    return results


def collect(rows, runs_dir: Path, metric: str, train: Callable[[Row, Path, int], None] | None,
            repeats: int = 1) -> list:
    """One result dict per row: the paper's number and ours, the mean of `metric` over the row's finished repeats
    (RUNS_DIR/<row>[-repeat<i>]/final_metrics.json, see `repeat_dir`), with each repeat's value and the spread
    (max - min) when there are several. `train(row, run_dir, repeat)`, when given, trains a missing repeat first.
    Raises DataError naming the file when a final_metrics.json is unreadable or lacks a numeric `metric` (a folder of
    another run, a hand edit): the table would otherwise show that row as "not run"."""
    results = []
    for row in rows:
        values, metrics, run_dirs = [], None, []
        for repeat in range(repeats):
            run_dir = repeat_dir(runs_dir, row, repeat)
            run_dirs.append(str(run_dir))
            run_metrics = read_final_metrics(run_dir, metric)
            if run_metrics is None and train is not None:
                log.info("training %s (repeat %d of %d) into %s", row.key, repeat + 1, repeats, run_dir)
                train(row, run_dir, repeat)
                run_metrics = read_final_metrics(run_dir, metric)
            if run_metrics is not None:
                metrics = metrics if metrics is not None else run_metrics
                values.append(run_metrics[metric])
        ours = sum(values) / len(values) if values else None
        status = "done" if len(values) == repeats else "not run" if not values else f"{len(values)} of {repeats} runs"
        result = {"row": row.key, "label": row.label, "paper": row.paper, "run_dir": run_dirs[0], "ours": ours,
                  "metrics": metrics, "status": status}
        if repeats > 1:
            result.update(run_dirs=run_dirs, values=values, spread=max(values) - min(values) if values else None)
        results.append(result)
    return results


def ladder_markdown(title: str, results: list, unit: str, scale: float = 1.0) -> str:
    """A ladder's rows, paper vs ours; `scale` turns our metric into the paper's unit. With repeats, ours is
    "mean ± half the spread (n runs)"."""
    lines = [f"# {title}", "", f"| row | paper {unit} | ours {unit} | difference | run |", "|---|---|---|---|---|"]
    for r in results:
        if r["ours"] is None:
            ours, diff = "not run", ""
        else:
            ours, diff = f"{r['ours'] * scale:.1f}", f"{r['ours'] * scale - r['paper']:+.1f}"
            if r.get("values") is not None:
                ours += f" ± {r['spread'] * scale / 2:.1f} ({len(r['values'])} runs)"
        lines.append(f"| {r['label']} | {r['paper']:.1f} | {ours} | {diff} | {r['run_dir']} |")
    return "\n".join(lines) + "\n"
