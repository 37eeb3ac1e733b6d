"""`rs-transfer reproduce TABLE` and `rs-transfer scale plan | run | report | suggest`: the paper's tables and its
scaling study, their parsers and handlers (the work is in this package's modules).

Standard library only at import (the handlers import the table and scaling modules, which import the config system
or torch), so `rs-transfer --help` stays fast.
"""

import json

from rs_transfer.options import out_path, whole
from rs_transfer.reproduce import run_ladder


def add_command(commands) -> None:
    """The `reproduce` subcommand on cli.py's subparsers."""
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
    reproduce.set_defaults(run=run_command)


def run_command(args) -> int:
    if args.table == "table5":
        from rs_transfer.reproduce.table5 import run_table5

        run_table5(args.checkpoints, args.data_roots, args.out or "results/table5", args.overrides, args.results,
                   dry_run=args.dry_run)
    else:
        run_ladder(args.table, args.out, args.train_missing, args.overrides, args.repeats, args.dry_run)
    return 0


def add_scale_command(commands) -> None:
    """`rs-transfer scale plan | run | report | suggest` on cli.py's subparsers (scaling.py, scaling_report.py)."""
    scale = commands.add_parser("scale", help="the paper's scaling study: plan, run, report, suggest")
    scale_commands = scale.add_subparsers(dest="scale_command", required=True, metavar="ACTION")

    plan_parser = scale_commands.add_parser("plan", help="the grid as configs with the paper's regularisation per point")
    plan_parser.add_argument("--depths", help="comma-separated (default: the paper's 26,50,101,200,300,350,400)")
    plan_parser.add_argument("--widths", help="width multipliers (default: 0.25,0.5,1,1.5,2)")
    plan_parser.add_argument("--resolutions", help="pixels (default: 128,160,224,320,448)")
    plan_parser.add_argument("--epochs", help="epoch regimes (default: 10,100,350)")
    plan_parser.add_argument("--efficientnet", help="also plan EfficientNet-RS points: b0,...,b7 at the resolutions "
                      "below each one's original (timm's efficientnet_bN, Section 7.2's RandAugment)")
    plan_parser.add_argument("--base", default="scaling/base.yaml",
                      help="the configs' base (default scaling/base.yaml: the RS recipe; scaling/demo.yaml: tiny CPU)")
    plan_parser.add_argument("--out", default="runs/scaling", type=out_path("--out"), help="the study folder (default runs/scaling)")
    plan_parser.add_argument("--dry-run", action="store_true", help="write nothing; config is null")
    plan_parser.add_argument("--json", action="store_true", help="print the points as a JSON list")
    plan_parser.add_argument("overrides", nargs="*", metavar="key=value", help="written into every config")
    plan_parser.set_defaults(run=run_scale_plan)

    run_parser = scale_commands.add_parser("run", help="train the study's points (finished ones skipped, others resumed)")
    run_parser.add_argument("--study", default="runs/scaling", type=out_path("--study"), help="the plan's folder (default runs/scaling)")
    run_parser.add_argument("--point", type=int, help="train only this point (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    run_parser.add_argument("--synthetic", action="store_true", help="train on a generated dataset in STUDY/synthetic_data")
    run_parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every run, e.g. data.root=DIR")
    run_parser.set_defaults(run=run_scale_run)

    latency_help = ("run: each run's recorded throughput (default); measure: bench/latency on this machine now")
    report_parser = scale_commands.add_parser("report", help="scaling.md/.json and top-1 vs GFLOPs / latency plots")
    report_parser.add_argument("--study", default="runs/scaling", type=out_path("--study"))
    report_parser.add_argument("--latency", default="run", choices=("run", "measure"), help=latency_help)
    report_parser.add_argument("--device", help="with --latency measure: cpu, cuda or cuda:N")
    report_parser.set_defaults(run=run_scale_report)

    suggest_parser = scale_commands.add_parser("suggest", help="what the paper's strategies recommend for a budget")
    budget = suggest_parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-flops", type=float, metavar="GFLOPS", help="forward GFLOPs per image")
    budget.add_argument("--budget-latency", type=float, metavar="S", help="training seconds per 128 images")
    suggest_parser.add_argument("--epochs", type=int, required=True, help="the training length you will use")
    suggest_parser.add_argument("--study", help="a study folder with finished points (default: the paper's points)")
    suggest_parser.add_argument("--latency", default="run", choices=("run", "measure"), help=latency_help)
    suggest_parser.add_argument("--json", action="store_true")
    suggest_parser.set_defaults(run=run_scale_suggest)


def run_scale_plan(args) -> int:
    from rs_transfer.models import zoo
    from rs_transfer.reproduce.scaling import REGIMES, format_plan, parse_list, plan

    points = plan(
        args.out,
        parse_list(args.depths, int, "--depths", zoo.SCALING_DEPTHS),
        parse_list(args.widths, float, "--widths", zoo.SCALING_WIDTHS),
        parse_list(args.resolutions, int, "--resolutions", zoo.SCALING_RESOLUTIONS),
        parse_list(args.epochs, int, "--epochs", REGIMES),
        efficientnet=parse_list(args.efficientnet, str, "--efficientnet", ()),
        base=args.base, overrides=args.overrides, dry_run=args.dry_run,
    )
    print(json.dumps(points, indent=2) if args.json else format_plan(points, args.out, args.dry_run))
    return 0


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
