"""The `rs-transfer` command (also `python -m rs_transfer`, which torchrun needs): parse, load config, call.

Each subcommand's work lives in its package; this file only declares arguments and dispatches, importing the
package when the subcommand runs so `rs-transfer models` starts fast. A `UserError` becomes one `error:` line
and exit code 2.
"""

import argparse
import errno
import json
import logging
import math
import os
import sys

from rs_transfer.errors import StoppedBySignal, UserError, has_control_character, one_line

CONFIG_HELP = "YAML config: a file, or a config shipped in the package by name, e.g. {example}"
RESUME_HELP = "continue the run in output_dir from its newest checkpoint (same as train.resume=auto)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "error: MESSAGE (see rs-transfer COMMAND --help)" and exit code 2, for the
    top-level parser and every subcommand's (subparsers are made of the parent's class). --help is unchanged."""

    def error(self, message: str):
        usage_error(self.prog, message)


def usage_error(prog: str, message: str):
    print(f"error: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


class OptionError(UserError):
    """A command-line option's value that makes no sense (a resolution of 0, a negative class count)."""


def whole(option: str, least: int):
    """An argparse `type=` for an integer option >= `least`; OptionError "OPTION must be ..." otherwise.

    A UserError (not argparse's ArgumentTypeError) so that main() turns it into its one `error:` line and returns
    2, like every other bad input; the option's name is given because argparse does not pass it to `type`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise OptionError(f"{option} must be a whole number >= {least}, got {text!r}") from None
        if value < least:
            raise OptionError(f"{option} must be at least {least}, got {value}")
        return value
    return parse


def out_path(option: str):
    """An argparse `type=` for a path the command writes (an output folder or file): one line of printable text;
    OptionError naming the option when it holds a control character (the rule config values follow: a newline in
    a folder name becomes a space when config.yaml is read back, another folder)."""
    def parse(text: str) -> str:
        if has_control_character(text):
            raise OptionError(f"{option} {text!r} holds a control character (a newline, tab, ...): a path is one "
                              "line of printable text")
        return text
    return parse


def positive_list(option: str, kind: type):
    """An argparse `type=` for a comma-separated list of positive numbers of `kind` (int or float), e.g. `200,400`;
    OptionError naming the option otherwise."""
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise OptionError(f"{option} must be comma-separated {kind.__name__}s, e.g. "
                              f"{'200,400' if kind is int else '0.01,0.02'}; got {text!r}") from None
        if not all(value > 0 and math.isfinite(value) for value in values):
            raise OptionError(f"{option} values must be positive, got {text!r}")
        return values
    return parse


def real(option: str, low: float, high: float | None = None, open_low: bool = False):
    """An argparse `type=` for a finite float option in [low, high] ((low, high] with `open_low`; no upper bound
    when `high` is None); OptionError naming the option otherwise."""
    rule = f"{'>' if open_low else '>='} {low:g}" if high is None else f"in {'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (value <= low if open_low else value < low) or (high is not None and value > high):
            raise OptionError(f"{option} must be a number {rule}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rs-transfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="the model zoo: layouts, params, GFLOPs, paper top-1, timm tags")
    models.add_argument("--json", action="store_true", help="print JSON for scripts")
    models.set_defaults(run=run_models)

    info = commands.add_parser("info", help="one model in detail (params and GFLOPs measured now)")
    info.add_argument("name", help="zoo name, e.g. rs152, rs101-w1.5, resnet152-w2")
    info.add_argument("--resolution", type=whole("--resolution", 1), action="append", help="GFLOPs at this size (repeatable)")
    info.add_argument("--num-classes", type=whole("--num-classes", 1), default=1000)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)

    index = commands.add_parser("index", help="write FOLDER/index.json for a folder of tar shards (one pass)")
    index.add_argument("folder", help="a folder of webdataset-layout .tar shards, e.g. /data/imagenet/train")
    index.add_argument("--workers", type=whole("--workers", 1), default=os.cpu_count() or 1, help="processes scanning shards")
    index.set_defaults(run=run_index)

    pretrain = commands.add_parser("pretrain", help="train a classifier with the RS recipe (ImageNet layout or shards)")
    pretrain.add_argument("--config", required=True, help=CONFIG_HELP.format(example="pretrain/rs50_i160.yaml"))
    pretrain.add_argument("--synthetic", action="store_true", help="generate a small dataset in OUTPUT_DIR and use it")
    pretrain.add_argument("--resume", action="store_true", help=RESUME_HELP)
    pretrain.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=DIR")
    pretrain.set_defaults(run=run_pretrain)

    pseudo = commands.add_parser("pseudo-label", help="label images with a teacher (sharded over ranks, resumable)")
    pseudo.add_argument("--teacher", required=True, help="the teacher: a pretrain (or folder_cls/cifar100) run folder, "
                        "which gives --model and --image-size, or a weights file (weights.pth, final.pt, timm's)")
    pseudo.add_argument("--images", required=True, help="a folder of images, a .tar shard or a folder of .tar shards")
    pseudo.add_argument("--out", required=True, type=out_path("--out"),
                        help="output folder (rerun the same command to resume)")
    pseudo.add_argument("--model", help="the teacher's zoo or timm name (default: the run's; rs152 for a file alone)")
    pseudo.add_argument("--image-size", type=whole("--image-size", 1),
                        help="teacher eval resolution (default: the run's; 224 for a file alone)")
    pseudo.add_argument("--batch-size", type=whole("--batch-size", 1), default=128, help="per process")
    pseudo.add_argument("--topk", type=whole("--topk", 0), default=10, help="probabilities kept per image for soft targets (0: none)")
    pseudo.add_argument("--threshold", type=real("--threshold", 0, 1), default=0.3, help="minimum confidence (Noisy Student: 0.3)")
    pseudo.add_argument("--per-class", type=whole("--per-class", 0), default=0,
                        help="balance to this many images per class (Noisy Student: 130000); 0: no balancing")
    pseudo.add_argument("--num-workers", type=whole("--num-workers", 0),
                        help="loader processes per process (default: 8, or fewer on a machine with fewer cores)")
    pseudo.add_argument("--max-batches", type=whole("--max-batches", 1), help="stop after this many batches per rank (resume later)")
    pseudo.set_defaults(run=run_pseudo_label)

    video = commands.add_parser("video", help="3D ResNet-RS on Kinetics-400 or your own videos (class folders, "
                                "path-label lists): train, 30-view evaluation")
    video_commands = video.add_subparsers(dest="video_command", required=True, metavar="ACTION")
    video_train = video_commands.add_parser("train", help="train a 3D model (torchrun for several processes)")
    video_train.add_argument("--config", required=True, help=CONFIG_HELP.format(example="video/demo.yaml"))
    video_train.add_argument("--resume", action="store_true", help=RESUME_HELP)
    video_train.add_argument("overrides", nargs="*", metavar="key=value")
    video_train.set_defaults(run=run_video_train)
    video_eval = video_commands.add_parser("eval", help="multi-view evaluation of a checkpoint on the val split")
    video_eval.add_argument("--checkpoint", required=True, help="a `video train` checkpoint (EMA weights preferred)")
    video_eval.add_argument("--views", type=whole("--views", 1), default=30, help="30 = 10 clips x 3 crops; 3 = 1 x 3; 1 = centre")
    video_eval.add_argument("--config", help="the run's config (default: config.yaml beside the checkpoint)")
    video_eval.add_argument("overrides", nargs="*", metavar="key=value")
    video_eval.set_defaults(run=run_video_eval)


    add_downstream_commands(commands)

    show = commands.add_parser("config", help="the resolved config of a training command, without running it")
    show_commands = show.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    shown = show_commands.add_parser("show", help="print the config that COMMAND would run with, as YAML, e.g. "
                                     "`rs-transfer config show finetune --task pascal_seg --backbone rs152`")
    shown.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                       help="finetune | sweep | pretrain | video train, with its options and key=value overrides")
    shown.set_defaults(run=run_config_show)

    runs = commands.add_parser("runs", help="list the runs under a folder: task, backbone, metric, wall time; or "
                               "--diff two runs' configs")
    runs.add_argument("folder", nargs="?", help="searched recursively for run folders (those holding config.yaml)")
    runs.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"),
                      help="the config keys whose values differ between two run folders, and what each changes")
    runs.add_argument("--sort", choices=("metric", "time", "name"), default="metric",
                      help="metric (highest first, default), time (longest first) or name")
    runs.add_argument("--json", action="store_true", help="print JSON for scripts")
    runs.set_defaults(run=run_runs)

    predict = commands.add_parser("predict", help="a trained run's model on new images (or videos): masks, boxes, "
                                  "depth, top-5 classes")
    predict.add_argument("--run", "--run-dir", dest="run_dir", required=True,
                         help="a finished run folder (OUTPUT_DIR: config.yaml, weights.pth); --run-dir under torchrun, "
                         "whose parser reads --run as its own --run-path")
    predict.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_FILE",
                         help="image (video) files, or folders searched recursively")
    predict.add_argument("--out", required=True, type=out_path("--out"),
                         help="output folder (predictions.json and the task's files)")
    predict.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    predict.add_argument("overrides", nargs="*", metavar="key=value",
                         help="evaluation keys of the run's config, e.g. task.tta=flip task.eval_mode=slide")
    predict.set_defaults(run=run_predict)

    export = commands.add_parser("export", help="a trained run's network as ONNX, TorchScript or a torch.export "
                                 "program, checked against PyTorch")
    export.add_argument("--run", "--run-dir", dest="run_dir", required=True,
                        help="a finished run folder (config.yaml, weights.pth); also spelled --run-dir")
    export.add_argument("--format", required=True, choices=("onnx", "torchscript", "pt2"),
                        help="onnx needs the export extra: pip install 'rs-transfer[export]'")
    export.add_argument("--resolution", type=whole("--resolution", 1), help="input height and width (default: the run's evaluation size)")
    export.add_argument("--out", type=out_path("--out"), help="output file, or an existing folder for FOLDER/model.<ext> "
                        "(default RUN/export/model.onnx|.ts|.pt2)")
    export.set_defaults(run=run_export)

    from rs_transfer.evaluate import add_command as add_evaluate  # stdlib imports only: --help stays fast

    add_evaluate(commands)

    reproduce = commands.add_parser("reproduce", help="a paper table: list, run or collect its runs; write TABLE.md/.json")
    reproduce.add_argument("table", help="table1, table2, table4 (pretraining), table5 (transfer), table6 (video)")
    reproduce.add_argument("--out", type=out_path("--out"),
                           help="ladder tables: rows are OUT/TABLE/<row> (default: the configs' own folder, "
                           "runs or runs/video); table5: the table's folder")
    reproduce.add_argument("--dry-run", action="store_true", help="list the runs (ladder tables: rows and configs; "
                           "table5: every grid point of every --checkpoint x --data), run nothing")
    reproduce.add_argument("--run", dest="train_missing", action="store_true",
                           help="ladder tables: train the rows that have no result yet (default: collect only)")
    reproduce.add_argument("--repeats", type=whole("--repeats", 1), default=1,
                           help="ladder tables: runs per row, seeds seed..seed+N-1; mean and spread reported (paper: 2)")
    reproduce.add_argument("--result", dest="results", action="append", default=[], metavar="LABEL:TASK=RUN_DIR",
                           help="table5: a finished finetune or sweep folder for one backbone label and task")
    reproduce.add_argument("--checkpoint", dest="checkpoints", action="append", default=[],
                           metavar="LABEL=BACKBONE:WEIGHTS", help="table5: sweep this checkpoint on every --data task")
    reproduce.add_argument("--data", dest="data_roots", action="append", default=[], metavar="TASK=DIR",
                           help="table5: a task to run and its data.root")
    reproduce.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. data.root=DIR")
    reproduce.set_defaults(run=run_reproduce)

    add_bench_commands(commands)
    add_scale_commands(commands)
    return parser


def add_scale_commands(commands) -> None:
    """`rs-transfer scale plan | run | report | suggest`: the paper's scaling study (reproduce/scaling.py)."""
    scale = commands.add_parser("scale", help="the paper's scaling study: plan, run, report, suggest")
    scale_commands = scale.add_subparsers(dest="scale_command", required=True, metavar="ACTION")

    plan = scale_commands.add_parser("plan", help="the grid as configs with the paper's regularisation per point")
    plan.add_argument("--depths", help="comma-separated (default: the paper's 26,50,101,200,300,350,400)")
    plan.add_argument("--widths", help="width multipliers (default: 0.25,0.5,1,1.5,2)")
    plan.add_argument("--resolutions", help="pixels (default: 128,160,224,320,448)")
    plan.add_argument("--epochs", help="epoch regimes (default: 10,100,350)")
    plan.add_argument("--efficientnet", help="also plan EfficientNet-RS points: b0,...,b7 at the resolutions "
                      "below each one's original (timm's efficientnet_bN, Section 7.2's RandAugment)")
    plan.add_argument("--base", default="scaling/base.yaml",
                      help="the configs' base (default scaling/base.yaml: the RS recipe; scaling/demo.yaml: tiny CPU)")
    plan.add_argument("--out", default="runs/scaling", type=out_path("--out"), help="the study folder (default runs/scaling)")
    plan.add_argument("--dry-run", action="store_true", help="write nothing; config is null")
    plan.add_argument("--json", action="store_true", help="print the points as a JSON list")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="written into every config")
    plan.set_defaults(run=run_scale_plan)

    run = scale_commands.add_parser("run", help="train the study's points (finished ones skipped, others resumed)")
    run.add_argument("--study", default="runs/scaling", type=out_path("--study"), help="the plan's folder (default runs/scaling)")
    run.add_argument("--point", type=int, help="train only this point (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    run.add_argument("--synthetic", action="store_true", help="train on a generated dataset in STUDY/synthetic_data")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run, e.g. data.root=DIR")
    run.set_defaults(run=run_scale_run)

    latency_help = ("run: each run's recorded throughput (default); measure: bench/latency on this machine now")
    report = scale_commands.add_parser("report", help="scaling.md/.json and top-1 vs GFLOPs / latency plots")
    report.add_argument("--study", default="runs/scaling", type=out_path("--study"))
    report.add_argument("--latency", default="run", choices=("run", "measure"), help=latency_help)
    report.add_argument("--device", help="with --latency measure: cpu, cuda or cuda:N")
    report.set_defaults(run=run_scale_report)

    suggest = scale_commands.add_parser("suggest", help="what the paper's strategies recommend for a budget")
    budget = suggest.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-flops", type=float, metavar="GFLOPS", help="forward GFLOPs per image")
    budget.add_argument("--budget-latency", type=float, metavar="S", help="training seconds per 128 images")
    suggest.add_argument("--epochs", type=int, required=True, help="the training length you will use")
    suggest.add_argument("--study", help="a study folder with finished points (default: the paper's points)")
    suggest.add_argument("--latency", default="run", choices=("run", "measure"), help=latency_help)
    suggest.add_argument("--json", action="store_true")
    suggest.set_defaults(run=run_scale_suggest)


def run_scale_plan(args) -> int:
    from rs_transfer.models import zoo
    from rs_transfer.reproduce.scaling import REGIMES, parse_list, plan

    points = plan(
        args.out,
        parse_list(args.depths, int, "--depths", zoo.SCALING_DEPTHS),
        parse_list(args.widths, float, "--widths", zoo.SCALING_WIDTHS),
        parse_list(args.resolutions, int, "--resolutions", zoo.SCALING_RESOLUTIONS),
        parse_list(args.epochs, int, "--epochs", REGIMES),
        efficientnet=parse_list(args.efficientnet, str, "--efficientnet", ()),
        base=args.base, overrides=args.overrides, dry_run=args.dry_run,
    )
    if args.json:
        print(json.dumps(points, indent=2))
        return 0
    print(f"{'#':>4}  {'model':<18}{'res':>5}{'epochs':>7}{'dropout':>8}{'RA':>5}{'SD':>6}{'LS':>6}  config")
    for i, p in enumerate(points):
        magnitude = "-" if p["randaugment_magnitude"] is None else f"{p['randaugment_magnitude']:g}"
        print(f"{i:>4}  {p['model']:<18}{p['resolution']:>5}{p['epochs']:>7}{p['dropout']:>8g}{magnitude:>5}"
              f"{p['stochastic_depth']:>6g}{p['label_smoothing']:>6g}  {p['config'] or '-'}")
    epochs = sum(p["epochs"] for p in points)
    by_regime = ", ".join(f"{sum(p['epochs'] == e for p in points)} x {e}" for e in sorted({p["epochs"] for p in points}))
    print(f"\n{len(points)} points ({by_regime} epochs): {epochs:,} epochs in all, {epochs * IMAGENET_TRAIN:,.3g} "
          f"training images at ImageNet's {IMAGENET_TRAIN:,} per epoch")
    if args.dry_run:
        print("dry run: nothing written")
    else:
        print(f"train them with `rs-transfer scale run --study {args.out} data.root=DIR` (or one per job: --point I)")
    return 0


IMAGENET_TRAIN = 1_281_167  # ImageNet-1k's training images, the scaling study's dataset


def run_scale_run(args) -> int:
    from rs_transfer.reproduce.scaling import run

    trained = run(args.study, args.point, args.overrides, synthetic=args.synthetic)
    print(f"trained {len(trained)} points: {', '.join(trained) or 'none (all finished)'}")
    return 0


def run_scale_report(args) -> int:
    from rs_transfer.reproduce.scaling_report import report

    paths = report(args.study, args.latency, args.device)
    print(paths[1].read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def run_scale_suggest(args) -> int:
    from rs_transfer.reproduce.scaling_report import format_suggestion, suggest

    result = suggest(args.epochs, args.budget_flops, args.budget_latency, args.study, args.latency)
    print(json.dumps(result, indent=2) if args.json else format_suggestion(result))
    return 0


def add_bench_commands(commands) -> None:
    """`rs-transfer bench SUBCOMMAND`: a new bench subcommand is one `bench_commands.add_parser(...)` block."""
    bench = commands.add_parser("bench", help="speed, memory and FLOPs the paper's way (Tables 3 and 7)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")

    timing = Parser(add_help=False)  # options every timed bench shares
    timing.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    timing.add_argument("--dtype", default="fp32", choices=("fp32", "tf32", "bf16"),
                        help="fp32 (TF32 off, like the paper's V100), tf32, or bf16 autocast")
    timing.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    timing.add_argument("--compile", nargs="?", const="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile the model (backend: inductor unless named); steps timed after compiling, "
                        "the first (compiling) step's time reported apart")
    timing.add_argument("--batch", type=whole("--batch", 1), help="start batch, halved until it fits (default 128 on GPU, 8 on CPU)")
    timing.add_argument("--warmup", type=whole("--warmup", 0), help="untimed steps first (default 5 on GPU, 1 on CPU)")
    timing.add_argument("--repeats", type=whole("--repeats", 1), help="timed steps, median reported (default 20 on GPU, 3 on CPU)")

    latency = bench_commands.add_parser("latency", parents=[timing],
                                        help="training-step latency, peak memory, inference throughput")
    latency.add_argument("--models", required=True, action="append",
                         help="NAME@RES[,NAME@RES...], e.g. rs50@160,efficientnet_b1@240")
    latency.add_argument("--json", action="store_true", help="print a JSON list of results")
    latency.set_defaults(run=run_bench_latency)

    table7 = bench_commands.add_parser("table7", parents=[timing],
                                       help="all Table 7 rows: table7.md, table7.json, pareto.png")
    table7.add_argument("--out", default="bench/table7", type=out_path("--out"), help="output folder (default bench/table7)")
    table7.add_argument("--only", action="append", help="measure only these Table 7 rows (NAME@RES,...)")
    table7.add_argument("--from", dest="sources", nargs="+", metavar="JSON",
                        help="render from saved results (latency --json output or table7.json), measure nothing")
    table7.add_argument("--fresh", action="store_true", help="ignore rows already in OUT/table7.json")
    table7.add_argument("--study", metavar="DIR", help="add a scaling study's measured points (ResNet-RS and "
                        "EfficientNet-RS; its scaling.json from `scale report`) to the table and the Pareto plot")
    table7.set_defaults(run=run_bench_table7)

    flops = bench_commands.add_parser("flops", help="params (M) and GFLOPs (2 x fvcore multiply-adds)")
    flops.add_argument("specs", nargs="+", metavar="NAME@RES", help="e.g. rs50@160 efficientnet_b0@224")
    flops.add_argument("--json", action="store_true", help="print a JSON list for scripts")
    flops.set_defaults(run=run_bench_flops)

    add_bench_data(bench_commands)

    index = bench_commands.add_parser("index", help="start-up memory and time of one rank at N samples over S shards")
    index.add_argument("--samples", type=whole("--samples", 1), default=1_000_000, help="N samples (default 1000000)")
    index.add_argument("--shards", type=whole("--shards", 2), default=100, help="S shards (default 100)")
    index.add_argument("--world", type=whole("--world", 1), default=8, help="ranks of the simulated run (default 8: one node)")
    index.add_argument("--topk", type=whole("--topk", 1), default=10, help="soft labels per pseudo-labelled image (default 10)")
    index.add_argument("--work-dir", type=out_path("--work-dir"),
                       help="where the descriptor and table are generated (default: a temp folder)")
    index.add_argument("--json", action="store_true", help="JSON output (it always is; for scripts' symmetry)")
    index.set_defaults(run=run_bench_index)

    video_data = bench_commands.add_parser("video-data", help="video loader: decoded training clips/s per worker")
    video_data.add_argument("--root", help="Kinetics root (default: 4 generated 10 s 340x256 videos)")
    video_data.add_argument("--workers", type=whole("--workers", 0), nargs="+", default=[0, 1, 2])
    video_data.add_argument("--clips", type=whole("--clips", 1), default=24)
    video_data.add_argument("--json", action="store_true", help="JSON output (it always is; for scripts' symmetry)")
    video_data.set_defaults(run=run_bench_video_data)


def _timing_kwargs(args) -> dict:
    from rs_transfer.bench.latency import timing_options

    return timing_options(args.device, args.dtype, args.channels_last, args.batch, args.warmup, args.repeats,
                          args.compile)


def run_bench_latency(args) -> int:
    from rs_transfer.bench.latency import format_results, measure
    from rs_transfer.bench.specs import parse_specs

    specs = parse_specs(args.models)
    kwargs = _timing_kwargs(args)
    results = [measure(spec, **kwargs) for spec in specs]
    print(json.dumps([r.to_dict() for r in results], indent=2) if args.json else format_results(results))
    return 0


def run_bench_table7(args) -> int:
    from pathlib import Path

    from rs_transfer.bench.specs import parse_specs
    from rs_transfer.reproduce.table7 import run_table7

    only = parse_specs(args.only) if args.only else None
    kwargs = {} if args.sources else _timing_kwargs(args)
    paths = run_table7(Path(args.out), only=only, sources=args.sources or (), fresh=args.fresh, study=args.study,
                       **kwargs)
    print(paths[1].read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def run_bench_flops(args) -> int:
    from rs_transfer.bench.flops import format_flops, params_and_gflops
    from rs_transfer.bench.specs import parse_specs

    rows = params_and_gflops(parse_specs(args.specs))
    print(json.dumps(rows, indent=2) if args.json else format_flops(rows))
    return 0


def add_bench_data(bench_commands) -> None:
    bench_data = bench_commands.add_parser("data", help="decoded + augmented images/s per loader worker: RS vs timm")
    bench_data.add_argument("--images", help="a folder of images to read (default: synthetic 500x375 JPEGs)")
    bench_data.add_argument("--count", type=whole("--count", 1), default=64, help="images held in memory and cycled")
    bench_data.add_argument("--resolution", type=whole("--resolution", 1), default=160)
    bench_data.add_argument("--magnitude", type=real("--magnitude", 0), default=10.0)
    bench_data.add_argument("--seconds", type=real("--seconds", 0, open_low=True), default=5.0, help="minimum CPU time per pipeline")
    bench_data.add_argument("--backend", choices=("torch", "dali"), default="torch",
                            help="dali: the DALI loader's main-thread CPU time per batch, feeder on it vs in processes")
    bench_data.add_argument("--json", action="store_true")
    bench_data.set_defaults(run=run_bench_data)


def add_downstream_commands(commands) -> None:
    from rs_transfer.downstream.registry import names  # task names only: no task module (nor torch) is imported

    TRANSFER_TASKS = names()

    for name, help_text in (("finetune", "fine-tune a backbone on a transfer task (one point of the grid)"),
                            ("sweep", "run a task's LR x steps grid (or one point of it) and pick the best")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--task", required=True, choices=TRANSFER_TASKS)
        sub.add_argument("--backbone", help="zoo name, e.g. rs152 (default: the config's model.name)")
        sub.add_argument("--weights", help="backbone checkpoint (timm's file or ours)")
        sub.add_argument("--config", help=CONFIG_HELP.format(example="downstream/pascal_seg_demo.yaml")
                         + " (default: downstream/<task>.yaml)")
        sub.add_argument("--synthetic", action="store_true", help="write and use a tiny dataset in the task's format")
        sub.add_argument("--resume", action="store_true",
                         help=RESUME_HELP if name == "finetune" else "continue every unfinished grid point")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
        sub.set_defaults(run=run_finetune if name == "finetune" else run_sweep)
    sweep = commands.choices["sweep"]
    sweep.add_argument("--point", type=whole("--point", 0), help="run only this grid point (0-based), e.g. one job per point")
    sweep.add_argument("--learning-rates", type=positive_list("--learning-rates", float), metavar="LR,LR,...",
                       help="the grid's learning rates (default: the paper's 0.005 ... 0.32)")
    sweep.add_argument("--steps", type=positive_list("--steps", int), metavar="N,N,...",
                       help="the grid's training lengths (default: the task's protocol, e.g. 5000,10000,20000)")
    demo = commands.add_parser("demo", help="fine-tune a tiny backbone on a generated dataset, end to end")
    demo.add_argument("--task", default="pascal_seg", choices=TRANSFER_TASKS)
    demo.add_argument("--data", type=out_path("--data"), help="folder for the generated dataset (default: a temporary folder)")
    demo.add_argument("--output", type=out_path("--output"), help="run folder (default: a temporary folder)")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.set_defaults(run=run_demo)


def with_resume(args) -> list:
    """The command's `key=value` overrides, plus train.resume=auto for --resume."""
    return [*args.overrides, "train.resume=auto"] if args.resume else list(args.overrides)


def run_finetune(args) -> int:
    from rs_transfer.downstream.finetune import finetune

    finetune(args.task, args.backbone, args.weights, args.config, with_resume(args), synthetic=args.synthetic)
    return 0


def run_sweep(args) -> int:
    from rs_transfer.downstream.finetune import sweep

    summary = sweep(args.task, args.backbone, args.weights, args.config, with_resume(args), point=args.point,
                    synthetic=args.synthetic, learning_rates=args.learning_rates, steps=args.steps)
    print(json.dumps(summary["best"]))
    return 0


def run_predict(args) -> int:
    from pathlib import Path

    from rs_transfer.predict import predict

    # --images takes every word after it: overrides given after it (task.tta=flip, not a file) are moved back
    overrides = [item for item in args.images if "=" in item and not Path(item).exists()]
    images = [item for item in args.images if item not in overrides]
    summary = predict(args.run_dir, images, args.out, args.device, [*args.overrides, *overrides])
    print(f"{len(summary['predictions'])} predictions ({len(summary['skipped'])} inputs skipped): "
          f"{args.out}/predictions.json")
    return 0


def run_demo(args) -> int:
    from rs_transfer.downstream.finetune import demo

    demo(args.task, args.data, args.output, args.overrides)
    return 0


def run_config_show(args) -> int:
    """The config a training command would run with: its file, options and overrides resolved and checked (a typo
    or bad value is the same error line as the command's). No torch is imported: pretraining's and video's schemas
    and the transfer task modules import none."""
    import yaml

    from rs_transfer.config import load_config, to_dict

    words = args.words
    if not words or words[0] not in ("finetune", "sweep", "pretrain", "video"):
        raise UserError("config show: give a training command, e.g. `rs-transfer config show finetune --task "
                        "pascal_seg`, `config show pretrain --config pretrain/demo.yaml`, `config show video train "
                        "--config video/demo.yaml`")
    inner, extra = build_parser().parse_known_args(words)
    overrides = [*getattr(inner, "overrides", []), *extra]
    if inner.command in ("finetune", "sweep"):
        from rs_transfer.downstream.finetune import make_config

        config = make_config(inner.task, inner.backbone, inner.weights, inner.config, overrides)
    elif inner.command == "pretrain":
        from rs_transfer.pretrain.config import PretrainConfig

        config = load_config(PretrainConfig, inner.config, overrides)
    elif getattr(inner, "video_command", None) == "train":
        from rs_transfer.video.config import VideoConfig

        config = load_config(VideoConfig, inner.config, overrides)
    else:
        raise UserError("config show: `video train` has a config to show; `video eval` evaluates a run's own")
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def run_runs(args) -> int:
    from rs_transfer.runs import MISSING, config_differences, find_runs, format_differences, format_runs, sort_runs

    if (args.folder is None) == (args.diff is None):
        raise UserError("rs-transfer runs: give a FOLDER to list, or --diff RUN_A RUN_B")
    if args.diff:
        rows = config_differences(*args.diff)
        if args.json:
            print(json.dumps([{"key": k, "a": None if a is MISSING else a, "b": None if b is MISSING else b,
                               "kind": kind} for k, a, b, kind in rows], indent=2))
        else:
            print(format_differences(rows, *args.diff))
        return 0

    rows = sort_runs(find_runs(args.folder), args.sort)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs under {args.folder} (a run folder holds config.yaml)")
    return 0


def run_models(args) -> int:
    from rs_transfer.models import zoo
    from rs_transfer.models.resnet_rs import count_params_fast

    rows = []
    for name in zoo.RELEASED + ("resnet152", "resnet152-w2", "resnet200", "resnet200-se", "resnet200-d"):
        spec = zoo.parse_name(name)
        paper = zoo.table7_rows(name)
        rows.append({
            "name": name,
            "layout": "-".join(map(str, spec.layout)),
            "se": spec.se,
            "resnet_d": spec.resnet_d,
            "params_m": round(count_params_fast(name) / 1e6, 2),
            "paper": [{"resolution": r.resolution, "gflops": r.gflops, "top1": r.top1} for r in paper],
            "timm_tag": zoo.TIMM_TAGS.get(name),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<14}{'layout':<12}{'params M':>9}  {'paper res: GFLOPs / top-1':<48}{'timm weights'}"
    print(header)
    print("-" * len(header))
    for row in rows:
        paper = ", ".join(f"{p['resolution']}: {p['gflops']:g} / {p['top1']}" for p in row["paper"]) or "-"
        print(f"{row['name']:<14}{row['layout']:<12}{row['params_m']:>9.2f}  {paper:<48}{row['timm_tag'] or '-'}")
    print("\nAny rs<depth>[-w<mult>] or resnet<depth>[-w<mult>][-se][-d] builds; depths 26 50 101 152 200 270 300 "
          "350 400 420. GFLOPs and top-1 are the paper's (Table 7); `rs-transfer info NAME` measures.")
    return 0


def run_info(args) -> int:
    from rs_transfer.models import zoo

    spec = zoo.parse_name(args.name)  # a bad name fails before torch and fvcore are imported (~3 s)
    from rs_transfer.bench.flops import count_gflops
    from rs_transfer.models.resnet_rs import build_resnet, count_params

    model = build_resnet(spec, num_classes=args.num_classes, init="timm")
    paper = zoo.table7_rows(args.name)
    resolutions = args.resolution or [r.resolution for r in paper] or [224]
    result = {
        "name": args.name,
        "depth": spec.depth,
        "layout": list(spec.layout),
        "width": spec.width,
        "se": spec.se,
        "resnet_d": spec.resnet_d,
        "params_m": round(count_params(model) / 1e6, 3),
        "gflops": {str(r): round(count_gflops(model, r), 2) for r in resolutions},
        "feature_channels": [info["num_chs"] for info in model.feature_info[1:]],
        "feature_strides": [info["reduction"] for info in model.feature_info[1:]],
        "timm_tag": zoo.TIMM_TAGS.get(args.name),
        "paper": [vars(r) for r in paper],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        print(f"{key:<18}{value}")
    return 0


def run_pretrain(args) -> int:
    from rs_transfer.pretrain.run import pretrain

    pretrain(args.config, with_resume(args), synthetic=args.synthetic)
    return 0


def run_pseudo_label(args) -> int:
    from rs_transfer.pretrain.pseudo_label import label_images, teacher_from_run

    teacher, model_name, image_size = teacher_from_run(args.teacher, args.model, args.image_size)
    label_images(teacher, args.images, args.out, model_name=model_name, image_size=image_size,
                 batch_size=args.batch_size, topk=args.topk, threshold=args.threshold, per_class=args.per_class,
                 num_workers=args.num_workers, max_batches=args.max_batches)
    return 0


def run_video_train(args) -> int:
    from rs_transfer.video.run import run_train

    print(json.dumps(run_train(args.config, with_resume(args))))
    return 0


def run_video_eval(args) -> int:
    from rs_transfer.video.run import run_eval

    print(json.dumps(run_eval(args.checkpoint, args.views, args.config, args.overrides)))
    return 0


def run_export(args) -> int:
    from rs_transfer.export import export_run

    result = export_run(args.run_dir, args.format, args.out, args.resolution)
    print(json.dumps({"path": str(result.path), "format": result.format, "max_abs_diff": result.max_abs_diff}))
    return 0


def run_reproduce(args) -> int:
    if args.table == "table5":
        from rs_transfer.reproduce.table5 import run_table5

        run_table5(args.checkpoints, args.data_roots, args.out or "results/table5", args.overrides, args.results,
                   dry_run=args.dry_run)
    else:
        from rs_transfer.reproduce import run_ladder

        run_ladder(args.table, args.out, args.train_missing, args.overrides, args.repeats, args.dry_run)
    return 0


def run_bench_data(args) -> int:
    from rs_transfer.bench.data import bench_dali_feeder, bench_data, print_dali_report, print_report

    if args.backend == "dali":
        print_dali_report(bench_dali_feeder(args.images, args.count, args.resolution, args.magnitude, args.seconds),
                          args.json)
        return 0
    print_report(bench_data(args.images, args.count, args.resolution, args.magnitude, args.seconds), args.json)
    return 0


def run_index(args) -> int:
    from rs_transfer.pretrain.shards import write_index

    path = write_index(args.folder, workers=args.workers)
    print(path)
    return 0


def run_bench_index(args) -> int:
    from rs_transfer.bench.index import bench_index

    print(json.dumps(bench_index(args.samples, args.shards, args.world, args.topk, args.work_dir)))
    return 0


def run_bench_video_data(args) -> int:
    from rs_transfer.bench.video_data import run_cli

    return run_cli(args)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except OptionError as error:  # a nonsense number, from the `type=` helpers above
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    # `key=value` overrides may follow options (`finetune ... --resume train.steps=2`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        command = [args.command, getattr(args, "video_command", None), getattr(args, "bench_command", None)]
        usage_error(" ".join(["rs-transfer", *filter(None, command)]), f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except StoppedBySignal as stop:  # not an error: the run saved its checkpoint and can be resumed
        print(f"stopped: {one_line(stop)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run's steps (importing torch, building the model): no traceback
        print("stopped: Ctrl-C (outside a training run's steps: no checkpoint written)", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's answer (a full disk, a read-only or missing folder): not a bug
        if error.errno is None:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror} (errno {errno.errorcode.get(error.errno, error.errno)})",
              file=sys.stderr)
        return 2
