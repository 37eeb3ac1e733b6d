"""Table 7 measured here (`rs-transfer bench table7`): every RS and EfficientNet row of the paper, the paper's V100
column beside ours, the RS/EfficientNet speed-up at equal accuracy (paper and measured), the paper's TPUv3 column
and its speed-up (nothing here measures a TPU: they are shown for comparison), and the Figure 4 style Pareto plot.
The measuring is rs_transfer/bench/latency.py's; this module runs it row by row and renders the table.

Equal accuracy: EfficientNet's latency is interpolated at each RS row's top-1, linearly in log-latency between
the two EfficientNet rows whose (paper) top-1 brackets it; speed-up = that latency / the RS row's latency.
RS rows outside EfficientNet's top-1 range, or whose bracketing rows were not measured, get no ratio.
One table holds one device, one dtype and one memory format: merging anything else is refused.

`study`: a finished scaling study (reproduce/scaling.py, its STUDY/scaling.json from `rs-transfer scale report`)
adds its measured points, ResNet-RS and EfficientNet-RS, to table7.md / table7.json and to the Pareto plot as
series of their own: top-1 measured on the study's data against the study's latency, next to the paper's rows.
"""

import logging
import math
from pathlib import Path

from rs_transfer.bench.latency import LatencyResult, device_name, format_results, measure
from rs_transfer.bench.specs import BenchSpec
from rs_transfer.errors import UserError
from rs_transfer.files import read_json
from rs_transfer.models.zoo import TABLE7
from rs_transfer.reproduce.common import write_table
from rs_transfer.reproduce.scaling import rs_family

log = logging.getLogger(__name__)

RATIO_METHOD = ("EfficientNet latency interpolated in log-latency at the RS row's top-1 (paper top-1), "
                "divided by the RS latency")


def family(model: str) -> str:
    """The label of `model`'s family (models/registry.py): "ResNet-RS", "EfficientNet"."""
    from rs_transfer.models import family_of

    return family_of(model).label


def table7_specs() -> list:
    return [BenchSpec(row.model, row.resolution) for row in TABLE7]


def select_specs(only) -> list:
    specs = table7_specs()
    if not only:
        return specs
    known = {str(s): s for s in specs}
    unknown = [str(s) for s in only if str(s) not in known]
    if unknown:
        raise UserError(f"--only {', '.join(unknown)}: not a Table 7 row; rows: {', '.join(known)}")
    return [known[str(s)] for s in only]


def check_one_setup(results, source: str = "results") -> None:
    """Refuse to put results from different devices, dtypes or memory formats in one table."""
    for attribute in ("device", "dtype", "channels_last"):
        groups = {}
        for r in results:
            groups.setdefault(getattr(r, attribute), []).append(r.spec)
        if len(groups) > 1:
            detail = "; ".join(f"{value}: {', '.join(specs)}" for value, specs in groups.items())
            raise UserError(f"{source} mix {attribute} values ({detail}); a table holds one {attribute}: "
                            f"measure or render each separately")


def interpolate_latency(points, top1: float) -> float | None:
    """Latency at `top1` on the curve through (top1, latency) points, linear in log-latency; None outside it."""
    points = sorted(points)
    for (a1, l1), (a2, l2) in zip(points, points[1:]):
        if a1 <= top1 <= a2:
            if a2 == a1:
                return min(l1, l2)
            frac = (top1 - a1) / (a2 - a1)
            return math.exp(math.log(l1) + frac * (math.log(l2) - math.log(l1)))
    return None


def speedups(latency: dict) -> dict:
    """RS spec -> EfficientNet latency at the RS row's top-1 / RS latency, from `latency` (spec -> seconds)."""
    effnet = [(row.top1, latency[f"{row.model}@{row.resolution}"]) for row in TABLE7
              if family(row.model) == "EfficientNet" and f"{row.model}@{row.resolution}" in latency]
    ratios = {}
    for row in TABLE7:
        spec = f"{row.model}@{row.resolution}"
        if family(row.model) == "ResNet-RS" and spec in latency:
            reference = interpolate_latency(effnet, row.top1)
            ratios[spec] = None if reference is None else reference / latency[spec]
    return ratios


def table_rows(results) -> list:
    measured = {r.spec: r for r in results}
    paper_ratio = speedups({f"{r.model}@{r.resolution}": r.v100_s for r in TABLE7})
    tpu_ratio = speedups({f"{r.model}@{r.resolution}": r.tpu_ms for r in TABLE7})
    measured_ratio = speedups({spec: r.train_s_per_128 for spec, r in measured.items()})
    rows = []
    for paper in TABLE7:
        spec = f"{paper.model}@{paper.resolution}"
        r = measured.get(spec)
        rows.append({
            "model": paper.model,
            "resolution": paper.resolution,
            "family": family(paper.model),
            "top1_paper": paper.top1,
            "v100_s_per_128_paper": paper.v100_s,
            "s_per_128": r.train_s_per_128 if r else None,
            "batch": r.batch if r else None,
            "peak_mem_gb": r.peak_mem_gb if r else None,
            "infer_img_s": r.infer_img_s if r else None,
            "speedup_paper": paper_ratio.get(spec),
            "speedup_measured": measured_ratio.get(spec),
            "tpu_ms_per_1024_paper": paper.tpu_ms,
            "speedup_tpu_paper": tpu_ratio.get(spec),
        })
    return rows


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def render_markdown(rows, setup: dict) -> str:
    lines = [
        f"# Table 7 measured on {setup['device']}",
        "",
        f"{setup['dtype']}, {'channels-last' if setup['channels_last'] else 'contiguous (NCHW)'}; training step "
        f"latency in seconds per 128 images (start batch {setup['start_batch']}, halved until it fits); median of "
        f"{setup['repeats']} steps after {setup['warmup']} warm-up; torch {setup['torch_version']}. Top-1 and the "
        f"V100 column are the paper's (V100, fp32); so are the last two columns (TPUv3, ms per 1024 images).",
        "",
        "| model | res | top-1 (paper) | V100 s/128 (paper) | measured s/128 | batch | peak mem GB | infer img/s "
        "| RS speed-up x (paper) | RS speed-up x (measured) | TPUv3 ms/1024 (paper) "
        "| RS speed-up x (paper, TPUv3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mem = _fmt(row["peak_mem_gb"], ".2f", "n/a" if row["s_per_128"] is not None else "-")
        lines.append(
            f"| {row['model']} | {row['resolution']} | {row['top1_paper']} | {row['v100_s_per_128_paper']} "
            f"| {_fmt(row['s_per_128'], '.3f')} | {_fmt(row['batch'], 'd')} | {mem} "
            f"| {_fmt(row['infer_img_s'], '.1f')} | {_fmt(row['speedup_paper'], '.2f')} "
            f"| {_fmt(row['speedup_measured'], '.2f')} | {_fmt(row['tpu_ms_per_1024_paper'], 'g')} "
            f"| {_fmt(row['speedup_tpu_paper'], '.2f')} |"
        )
    lines += ["", f"Speed-up at equal accuracy: {RATIO_METHOD}."]
    for key, label in (("speedup_paper", "paper (V100)"), ("speedup_measured", "measured"),
                       ("speedup_tpu_paper", "paper (TPUv3)")):
        values = [row[key] for row in rows if row[key] is not None]
        span = f"{min(values):.2f}x to {max(values):.2f}x over {len(values)} RS rows" if values else "none"
        lines.append(f"- {label}: {span}")
    lines.append("")
    return "\n".join(lines)


def load_study(study) -> dict:
    """The measured points of a finished scaling study, from STUDY/scaling.json (written by `scale report`):
    {"path", "latency_source", "points": [{"model", "resolution", "epochs", "family" ("ResNet-RS" or
    "EfficientNet-RS"), "top1_measured" (percent), "s_per_128" (seconds per 128 training images, or None),
    "gflops"}]}, points in the report's order. Raises UserError when the file is missing, is not a scaling report
    or holds no point."""
    path = Path(study) / "scaling.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file; write it with `rs-transfer scale report --study {study}`")
    document = read_json(path, "a scaling report (rs-transfer scale report writes it)")
    try:
        points = [{"model": p["model"], "resolution": p["resolution"], "epochs": p["epochs"],
                   "family": rs_family(p["model"]),
                   "top1_measured": 100 * p["top1"], "s_per_128": p["latency_s_per_128"], "gflops": p["gflops"]}
                  for p in document["points"]]
        source = document["latency_source"]
    except (KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: not a scaling report ({type(error).__name__}: {error})") from None
    for index, point in enumerate(points):  # a hand edit would otherwise fail in the table's number formatting
        for key in ("resolution", "epochs", "top1_measured", "s_per_128", "gflops"):
            value = point[key]
            if not (value is None and key == "s_per_128" or _finite(value)):
                raise UserError(f"{path}: point {index} ({point['model']!r}): {key} = {value!r:.40} is not a number")
    if not points:
        raise UserError(f"{path}: no finished point")
    return {"path": str(path.parent.resolve()), "latency_source": source, "points": points}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def render_study(study: dict) -> str:
    """The markdown section of a study's measured points (appended to table7.md)."""
    lines = [
        f"## Scaling study measured here ({study['path']})",
        "",
        f"Top-1 measured on the study's own data and epochs (ImageNet only if the study trained on it); latency: "
        f"{study['latency_source']}. Neither column is the paper's.",
        "",
        "| family | model | res | epochs | top-1 % (measured) | s/128 (measured) | GFLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in study["points"]:
        lines.append(f"| {p['family']} | {p['model']} | {p['resolution']} | {p['epochs']} | {p['top1_measured']:.1f} "
                     f"| {_fmt(p['s_per_128'], '.3g')} | {p['gflops']:.3g} |")
    lines.append("")
    return "\n".join(lines)


def pareto_figure(rows, setup: dict, study: dict | None = None):
    # Figure without pyplot: no global backend state, always the Agg canvas.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for fam, color in (("ResNet-RS", "tab:red"), ("EfficientNet", "tab:blue")):
        mine = [r for r in rows if r["family"] == fam]
        measured = [r for r in mine if r["s_per_128"] is not None]
        ax.plot([r["v100_s_per_128_paper"] for r in mine], [r["top1_paper"] for r in mine], "--", color=color,
                alpha=0.35, label=f"{fam} (paper, V100)")
        if measured:
            ax.plot([r["s_per_128"] for r in measured], [r["top1_paper"] for r in measured], "o-", color=color,
                    label=f"{fam} (measured)")
            for r in measured:
                ax.annotate(f"{r['model'].replace('efficientnet_', '')}@{r['resolution']}",
                            (r["s_per_128"], r["top1_paper"]), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
    for fam, marker, color in (("ResNet-RS", "^", "tab:orange"), ("EfficientNet-RS", "s", "tab:cyan")):
        mine = [p for p in (study or {}).get("points", ()) if p["family"] == fam and p["s_per_128"] is not None]
        if mine:
            ax.plot([p["s_per_128"] for p in mine], [p["top1_measured"] for p in mine], marker, color=color,
                    linestyle="none", label=f"{fam} (scaling study, measured here: top-1 and latency)")
            for p in mine:
                ax.annotate(f"{p['model'].replace('efficientnet_', '')}@{p['resolution']}/{p['epochs']}e",
                            (p["s_per_128"], p["top1_measured"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training step latency, s per 128 images (log)")
    ax.set_ylabel("ImageNet top-1 (paper)" if study is None else "top-1 % (paper: ImageNet; study: its data)")
    ax.set_title(f"{setup['device']}, {setup['dtype']}{', channels-last' if setup['channels_last'] else ''}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_table7(results, out_dir: Path, plot: bool = True, study: dict | None = None) -> list:
    """Write table7.json, table7.md and (if `plot`) pareto.png for results measured on one device, with a
    `load_study` study's points (table7.json "study", a table7.md section, their own plot series) when given."""
    results = list(results)
    if not results:
        raise UserError("no Table 7 results to write")
    check_one_setup(results)
    setup = {key: getattr(results[0], key) for key in ("device", "dtype", "channels_last")}
    for key in ("start_batch", "warmup", "repeats", "torch_version"):  # may differ between merged files
        setup[key] = "/".join(sorted({str(getattr(r, key)) for r in results}))
    rows = table_rows(results)
    document = {**setup, "ratio_method": RATIO_METHOD, "rows": rows, "results": [r.to_dict() for r in results]}
    markdown = render_markdown(rows, setup)
    if study is not None:
        document["study"] = study
        markdown += "\n" + render_study(study)
    figures = {"pareto.png": pareto_figure(rows, setup, study)} if plot else {}
    return write_table(out_dir, "table7", markdown, document, figures)


def load_results(path: Path) -> list:
    """Latency results from a table7.json or from `bench latency --json` output."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    data = read_json(path, "latency results (bench latency --json) or a table7.json")
    items = data.get("results") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a list of latency results or a table7.json")
    return [LatencyResult.from_dict(item, source=str(path)) for item in items]


def run_table7(out_dir: Path, device=None, dtype: str = "fp32", channels_last: bool = False, start_batch: int = 128,
               warmup: int = 5, repeats: int = 20, only=None, sources=(), fresh: bool = False, study=None,
               measure_fn=measure, compile: str | None = None) -> list:
    """Measure the Table 7 rows (or render `sources` without measuring) and write the table after every row.

    Rows already in out_dir/table7.json with the same device, dtype and memory format are reused (so a run cut
    short resumes), unless `fresh`. `study`: a scaling study folder whose measured points join the table and the
    plot (`load_study`; read before anything is measured).
    """
    out_dir = Path(out_dir)
    study = None if study is None else load_study(study)
    if sources:
        results = [r for source in sources for r in load_results(source)]
        check_one_setup(results, source=" + ".join(map(str, sources)))
        return write_table7(results, out_dir, study=study)
    specs = select_specs(only)
    done = {}
    existing = out_dir / "table7.json"
    if existing.exists() and not fresh:
        previous = load_results(existing)
        here = (device_name(device), dtype, channels_last, compile)
        for r in previous:
            if (r.device, r.dtype, r.channels_last, r.compile_backend) != here:
                raise UserError(
                    f"{existing} holds results from {r.device}, {r.dtype}, channels_last={r.channels_last}, "
                    f"compile={r.compile_backend}; this run is {here[0]}, {dtype}, channels_last={channels_last}, "
                    f"compile={compile}: one table holds one setup, so choose another --out (or --fresh to replace it)"
                )
        done = {r.spec: r for r in previous}
        log.info("resuming %s: %d rows already measured", existing, len(done))
    for spec in specs:
        if str(spec) in done:
            continue
        done[str(spec)] = measure_fn(spec, device, dtype=dtype, channels_last=channels_last, compile=compile,
                                     start_batch=start_batch, warmup=warmup, repeats=repeats)
        log.info("%s", format_results([done[str(spec)]]).splitlines()[2])
        write_table7(done.values(), out_dir, plot=False, study=study)  # a run cut short keeps every finished row
    return write_table7(done.values(), out_dir, study=study)
