"""`rs-transfer scale report | suggest`: read a scaling study's finished points (reproduce/scaling.py).

report: top-1 of every finished point against GFLOPs and against training latency, like the paper's Figures 2
and 3 (one panel per epoch regime; one curve per depth and one per width, and one per EfficientNet-RS model), with
the Pareto front, written as STUDY/scaling.json, scaling.md, scaling_flops.png and scaling_latency.png through
common.write_table. `bench table7 --study STUDY` puts the same points beside Table 7 (reproduce/table7.py).

Latency is seconds per 128 training images, from one of two sources (the table says which):
- "run": the run's own throughput, 128 / median images_per_s of its metrics.jsonl train records (data loading
  included; the run's device);
- "measure": bench/latency.py's training step on random images, on this machine's device now.

suggest: what the paper's two strategies recommend for a budget (Section 6: scale depth where overfitting can
occur, i.e. long training; width for short training; raise resolution slowly), from the study's measured points
when given, else from the paper's own points (Table 7 for long training, a width ladder for short).
"""

import logging
import math
import statistics
from pathlib import Path

from rs_transfer.engine.run_log import read_events
from rs_transfer.engine.summary import read_final_metrics
from rs_transfer.errors import UserError
from rs_transfer.models.zoo import SCALING_WIDTHS, TABLE7
from rs_transfer.reproduce.common import write_table
from rs_transfer.reproduce.scaling import (
    EFFICIENTNET_RESOLUTION,
    SHORT_REGIME_MAX_EPOCHS,
    is_finished,
    load_plan,
    point_key,
    run_dir,
)

log = logging.getLogger(__name__)

PAPER_BATCH = 128
LATENCY_SOURCES = {
    "run": "the run's training throughput (metrics.jsonl images_per_s, data loading included), on the run's device",
    "measure": "bench/latency training step on random images, measured now on {device}",
}


def run_latency(folder: Path) -> float | None:
    """Seconds per 128 images from a run's metrics.jsonl (median of its train records), None if none."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [event["images_per_s"] for event in read_events(path)
             if event.get("kind") == "train" and event.get("images_per_s")]
    return PAPER_BATCH / statistics.median(rates) if rates else None


def pareto_front(points: list, cost: str) -> list:
    """The points no other point beats: none has lower-or-equal `cost` and higher top-1. Sorted by cost."""
    ranked = sorted((p for p in points if p.get(cost) is not None), key=lambda p: (p[cost], -p["top1"]))
    front, best = [], float("-inf")
    for p in ranked:
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def collect(study, latency: str = "run", device=None, measure_fn=None) -> list:
    """One dict per finished point (ResNet-RS and EfficientNet-RS): the plan's fields plus top1 (fraction), gflops,
    params_m, latency (s per 128 images) and run_dir. `latency` is "run" or "measure" (see the module doc)."""
    from rs_transfer.bench.flops import params_and_gflops
    from rs_transfer.bench.specs import BenchSpec

    if latency not in LATENCY_SOURCES:
        raise UserError(f"--latency {latency!r}: expected one of {', '.join(LATENCY_SOURCES)}")
    rows = []
    for point in load_plan(study):
        if point["config"] is None or not is_finished(study, point):
            continue
        folder = run_dir(study, point)
        metrics = read_final_metrics(folder, metric="top1")  # DataError naming the file: unreadable, no top1
        spec = BenchSpec(point["model"], point["resolution"])
        size = params_and_gflops([spec])[0]
        if latency == "run":
            seconds = run_latency(folder)
        else:
            seconds = (measure_fn or _measure)(spec, device).train_s_per_128
        rows.append({**point, "key": point_key(point), "top1": metrics["top1"], "gflops": size["gflops"],
                     "params_m": size["params_m"], "latency_s_per_128": seconds, "run_dir": str(folder)})
    return rows


def _measure(spec, device):
    from rs_transfer.bench.latency import measure, timing_options

    return measure(spec, **timing_options(device))


def report(study, latency: str = "run", device=None, measure_fn=None) -> list:
    """Write STUDY/scaling.json, scaling.md, scaling_flops.png, scaling_latency.png; returns their paths.
    Raises UserError when no point has finished."""
    rows = collect(study, latency, device, measure_fn)
    total = sum(p["config"] is not None for p in load_plan(study))
    if not rows:
        raise UserError(f"{study}: no finished point yet; train them with `rs-transfer scale run --study {study}`")
    source = LATENCY_SOURCES[latency].format(device=_device_label(device) if latency == "measure" else "")
    for cost in ("gflops", "latency_s_per_128"):
        for regime in sorted({r["epochs"] for r in rows}):
            front = {r["key"] for r in pareto_front([r for r in rows if r["epochs"] == regime], cost)}
            for r in rows:
                if r["epochs"] == regime:
                    r[f"pareto_{cost}"] = r["key"] in front
    document = {"study": str(Path(study).resolve()), "latency_source": source, "finished": len(rows),
                "planned": total, "points": rows}
    figures = {"scaling_flops.png": figure(rows, "gflops", "GFLOPs (log)"),
               "scaling_latency.png": figure(rows, "latency_s_per_128", "training latency, s per 128 images (log)")}
    return write_table(study, "scaling", markdown(rows, source, total), document, figures)


def _device_label(device) -> str:
    from rs_transfer.bench.latency import device_name
    from rs_transfer.engine.device import resolve_device

    return device_name(resolve_device(device))


def markdown(rows: list, source: str, total: int) -> str:
    lines = ["# Scaling study", "", f"{len(rows)} of {total} planned points finished. Latency: {source}.",
             "Pareto: on the front of top-1 against GFLOPs (F) and against latency (L), within its epoch regime.", "",
             "| model | res | epochs | params M | GFLOPs | s / 128 img | top-1 % | Pareto | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["epochs"], r["gflops"])):
        latency = "-" if r["latency_s_per_128"] is None else f"{r['latency_s_per_128']:.3g}"
        pareto = "".join(tag for tag, key in (("F", "pareto_gflops"), ("L", "pareto_latency_s_per_128")) if r.get(key))
        lines.append(f"| {r['model']} | {r['resolution']} | {r['epochs']} | {r['params_m']:.2f} | {r['gflops']:.3g} "
                     f"| {latency} | {100 * r['top1']:.1f} | {pareto or '-'} | {r['run_dir']} |")
    return "\n".join(lines) + "\n"


def figure(rows: list, cost: str, xlabel: str):
    """Rows of panels: curves per depth (top), curves per width (bottom); one column per epoch regime. Each curve
    joins its points in cost order; EfficientNet-RS points (no depth or width) are one dashed curve per model in
    both rows; the black line is the regime's Pareto front."""
    from matplotlib.figure import Figure

    regimes = sorted({r["epochs"] for r in rows})
    fig = Figure(figsize=(4.2 * len(regimes), 7), dpi=110, layout="constrained")
    axes = fig.subplots(2, len(regimes), squeeze=False)
    for column, regime in enumerate(regimes):
        mine = [r for r in rows if r["epochs"] == regime and r[cost] is not None]
        resnets = [r for r in mine if r["depth"] is not None]
        curves = [(f"efficientnet_{v}", "s--", [r for r in mine if r["model"] == f"efficientnet_{v}"])
                  for v in EFFICIENTNET_RESOLUTION]
        for row, (field, label) in enumerate((("depth", "depth {}"), ("width", "width {:g}"))):
            ax = axes[row][column]
            by_field = [(label.format(value), "o-", [r for r in resnets if r[field] == value])
                        for value in sorted({r[field] for r in resnets})]
            for name, style, curve in by_field + curves:
                if not curve:
                    continue
                curve = sorted(curve, key=lambda r: r[cost])
                ax.plot([r[cost] for r in curve], [100 * r["top1"] for r in curve], style, label=name)
                for r in curve:
                    ax.annotate(f"{r['resolution']}", (r[cost], 100 * r["top1"]), fontsize=6, xytext=(2, 2),
                                textcoords="offset points")
            front = pareto_front(mine, cost)
            if front:
                ax.plot([r[cost] for r in front], [100 * r["top1"] for r in front], "k--", lw=1, label="Pareto front")
            ax.set_xscale("log")
            ax.set_title(f"{regime} epochs: one curve per {field} (labels: resolution)", fontsize=8)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("top-1 %", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    return fig


def strategy(epochs: int) -> str:
    """Section 6's rule for the regime of `epochs`."""
    if epochs > SHORT_REGIME_MAX_EPOCHS:
        return (f"{epochs} epochs is a long regime where overfitting can occur: scale depth (Strategy 1), keep width "
                "1.0 and raise resolution slowly (Strategy 2)")
    return (f"{epochs} epochs is a short regime: scale width (Strategy 1, 10 and 100 epochs; at 100 epochs the "
            "paper found depth and width close, depending on resolution) and raise resolution slowly (Strategy 2)")


def paper_candidates(epochs: int) -> list:
    """The paper's own points when no study exists. Long training: Table 7's ResNet-RS rows (depth scaled,
    resolution raised slowly; 350 epochs; GFLOPs and V100 s/128 are the paper's). Short training: RS-50 with the
    width scaled first and resolution raised slowly (128 up to width 1.0, then 160, then 224); their cost is
    estimated from Table 7's RS-50@160 as x width^2 x (res / 160)^2, and they have no paper top-1."""
    if epochs > SHORT_REGIME_MAX_EPOCHS:
        return [{"model": r.model, "resolution": r.resolution, "gflops": r.gflops, "latency_s_per_128": r.v100_s,
                 "top1": r.top1 / 100, "source": "Table 7 (paper, V100)"} for r in TABLE7 if r.model.startswith("rs")]
    anchor = next(r for r in TABLE7 if r.model == "rs50" and r.resolution == 160)
    ladder = [(w, 128 if w <= 1.0 else 160) for w in SCALING_WIDTHS] + [(2.0, 224)]
    return [{"model": f"rs50-w{w:g}", "resolution": res, "gflops": anchor.gflops * w ** 2 * (res / 160) ** 2,
             "latency_s_per_128": anchor.v100_s * w ** 2 * (res / 160) ** 2, "top1": None,
             "source": "estimated from Table 7's RS-50@160"} for w, res in ladder]


def suggest(epochs: int, budget_flops: float | None = None, budget_latency: float | None = None,
            study=None, latency: str = "run") -> dict:
    """The recommendation for a budget: {"strategy", "budget", "recommended" (a point or None), "points" (the ones it
    is based on, within budget, cheapest first), "source"}. With a study, the recommended point is its best
    measured top-1 within budget among the points of the nearest epoch regime; without, the largest of the
    paper's points within budget. Raises UserError unless exactly one budget is given, for a budget that is not
    positive and finite, or for an empty study."""
    if (budget_flops is None) == (budget_latency is None):
        raise UserError("give exactly one of --budget-flops GFLOPS or --budget-latency SECONDS_PER_128_IMAGES")
    for option, value in (("--budget-flops", budget_flops), ("--budget-latency", budget_latency)):
        # nan compares false with everything, so it would pass `cost <= budget` silently: "nothing fits".
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{option} {value:g}: expected a positive, finite number")
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    cost, budget = ("gflops", budget_flops) if budget_flops is not None else ("latency_s_per_128", budget_latency)
    if study is not None:
        rows = collect(study, latency)
        if not rows:
            raise UserError(f"{study}: no finished point to base a suggestion on")
        regime = min({r["epochs"] for r in rows}, key=lambda e: (abs(e - epochs), e))
        candidates = [r for r in rows if r["epochs"] == regime and r[cost] is not None]
        source = f"measured points of {study} at {regime} epochs"
        within = sorted((r for r in candidates if r[cost] <= budget), key=lambda r: r[cost])
        recommended = max(within, key=lambda r: r["top1"]) if within else None
    else:
        candidates = paper_candidates(epochs)
        source = candidates[0]["source"]
        within = sorted((r for r in candidates if r[cost] <= budget), key=lambda r: r[cost])
        recommended = within[-1] if within else None
    return {"strategy": strategy(epochs), "budget": {cost: budget}, "recommended": recommended, "points": within,
            "source": source}


def format_suggestion(result: dict) -> str:
    (cost, budget), = result["budget"].items()
    unit = "GFLOPs" if cost == "gflops" else "s per 128 images"
    lines = [f"strategy: {result['strategy']}", f"budget: {budget:g} {unit}; based on {result['source']}"]
    best = result["recommended"]
    lines.append("recommended: " + (f"{best['model']} at {best['resolution']} px" if best else
                                    "nothing fits this budget: raise it or plan smaller points"))
    lines.append(f"\n{'model':<16}{'res':>5}{'GFLOPs':>10}{'s/128':>10}{'top-1 %':>9}")
    for r in result["points"]:
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}"
        latency = "-" if r["latency_s_per_128"] is None else f"{r['latency_s_per_128']:.3g}"
        mark = "  <- recommended" if r is best else ""
        lines.append(f"{r['model']:<16}{r['resolution']:>5}{r['gflops']:>10.3g}{latency:>10}{top1:>9}{mark}")
    return "\n".join(lines)
