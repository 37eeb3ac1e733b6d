"""The `rs-transfer` command (also `python -m rs_transfer`, which torchrun needs): parse, load config, call.

Each subcommand's work lives in its package; this file only declares arguments and dispatches, importing the
package when the subcommand runs so `rs-transfer models` starts fast. A `UserError` becomes one `error:` line
and exit code 2.
"""

import argparse
import json
import logging
import sys

from rs_transfer.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rs-transfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="the model zoo: layouts, params, GFLOPs, paper top-1, timm tags")
    models.add_argument("--json", action="store_true", help="print JSON for scripts")
    models.set_defaults(run=run_models)

    info = commands.add_parser("info", help="one model in detail (params and GFLOPs measured now)")
    info.add_argument("name", help="zoo name, e.g. rs152, rs101-w1.5, resnet152-w2")
    info.add_argument("--resolution", type=int, action="append", help="GFLOPs at this size (repeatable)")
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)
    add_downstream_commands(commands)
    return parser


def add_downstream_commands(commands) -> None:
    from rs_transfer.downstream.protocol import TASKS as TRANSFER_TASKS  # plain data, no torch import

    for name, help_text in (("finetune", "fine-tune a backbone on a transfer task (one point of the grid)"),
                            ("sweep", "run a task's LR x steps grid (or one point of it) and pick the best")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--task", required=True, choices=TRANSFER_TASKS)
        sub.add_argument("--backbone", help="zoo name, e.g. rs152 (default: the config's model.name)")
        sub.add_argument("--weights", help="backbone checkpoint (timm's file or ours)")
        sub.add_argument("--config", help="YAML config (default: configs/downstream/<task>.yaml)")
        sub.add_argument("--synthetic", action="store_true", help="write and use a tiny dataset in the task's format")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
        sub.set_defaults(run=run_finetune if name == "finetune" else run_sweep)
    sweep = commands.choices["sweep"]
    sweep.add_argument("--point", type=int, help="run only this grid point (0-based), e.g. one job per point")
    demo = commands.add_parser("demo", help="fine-tune a tiny backbone on a generated dataset, end to end")
    demo.add_argument("--task", default="pascal_seg", choices=TRANSFER_TASKS)
    demo.add_argument("--data", help="folder for the generated dataset (default: a temporary folder)")
    demo.add_argument("--output", help="run folder (default: a temporary folder)")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.set_defaults(run=run_demo)
    reproduce = commands.add_parser("reproduce", help="collect runs into a paper table beside the paper's numbers")
    reproduce.add_argument("table", choices=["table5"])
    reproduce.add_argument("--run", dest="runs", action="append", default=[], metavar="LABEL:TASK=RUN_DIR",
                           help="a finished finetune or sweep folder (repeatable)")
    reproduce.add_argument("--output", default="results/table5")
    reproduce.set_defaults(run=run_reproduce)


def run_finetune(args) -> int:
    from rs_transfer.downstream.finetune import finetune

    finetune(args.task, args.backbone, args.weights, args.config, args.overrides, synthetic=args.synthetic)
    return 0


def run_sweep(args) -> int:
    from rs_transfer.downstream.finetune import sweep

    summary = sweep(args.task, args.backbone, args.weights, args.config, args.overrides, point=args.point,
                    synthetic=args.synthetic)
    print(json.dumps(summary["best"]))
    return 0


def run_demo(args) -> int:
    from rs_transfer.downstream.finetune import demo

    demo(args.task, args.data, args.output, args.overrides)
    return 0


def run_reproduce(args) -> int:
    from rs_transfer.downstream.finetune import reproduce_table5

    reproduce_table5(args.runs, args.output)
    return 0


def run_models(args) -> int:
    from rs_transfer.models import zoo
    from rs_transfer.models.resnet_rs import RELEASED, count_params_fast, parse_name

    rows = []
    for name in RELEASED + ("resnet152", "resnet152-w2", "resnet200", "resnet200-se", "resnet200-d"):
        spec = parse_name(name)
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
    from rs_transfer.bench.flops import count_gflops
    from rs_transfer.models import zoo
    from rs_transfer.models.resnet_rs import build_resnet, count_params, parse_name

    spec = parse_name(args.name)
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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
