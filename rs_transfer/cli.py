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

    video = commands.add_parser("video", help="3D ResNet-RS on Kinetics-400: train, 30-view evaluation")
    video_commands = video.add_subparsers(dest="video_command", required=True, metavar="ACTION")
    video_train = video_commands.add_parser("train", help="train a 3D model (torchrun for several processes)")
    video_train.add_argument("--config", required=True, help="YAML config, e.g. configs/video/demo.yaml")
    video_train.add_argument("overrides", nargs="*", metavar="key=value")
    video_train.set_defaults(run=run_video_train)
    video_eval = video_commands.add_parser("eval", help="multi-view evaluation of a checkpoint on the val split")
    video_eval.add_argument("--checkpoint", required=True, help="a `video train` checkpoint (EMA weights preferred)")
    video_eval.add_argument("--views", type=int, default=30, help="30 = 10 clips x 3 crops; 3 = 1 x 3; 1 = centre")
    video_eval.add_argument("--config", help="the run's config (default: config.yaml beside the checkpoint)")
    video_eval.add_argument("overrides", nargs="*", metavar="key=value")
    video_eval.set_defaults(run=run_video_eval)

    reproduce = commands.add_parser("reproduce", help="run or collect a paper table's grid, write TABLE.md/.json")
    reproduce.add_argument("table", help="table6")
    reproduce.add_argument("--out", default="runs/reproduce", help="runs go in OUT/TABLE/<row>, tables in OUT")
    reproduce.add_argument("--run", dest="train_missing", action="store_true", help="train rows that have no result yet")
    reproduce.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every row")
    reproduce.set_defaults(run=run_reproduce)
    return parser


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


def run_video_train(args) -> int:
    from rs_transfer.video.task import run_train

    print(json.dumps(run_train(args.config, args.overrides)))
    return 0


def run_video_eval(args) -> int:
    from rs_transfer.video.task import run_eval

    print(json.dumps(run_eval(args.checkpoint, args.views, args.config, args.overrides)))
    return 0


def run_reproduce(args) -> int:
    from rs_transfer.reproduce import run_table

    run_table(args.table, args.out, args.train_missing, args.overrides)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
