"""`rs-transfer models` (the zoo as a table) and `rs-transfer info NAME` (one model measured): parsers and handlers.

Torch-free at import, and `models` and a bad `info` name never import torch or fvcore: a name is parsed
(models/zoo.py) before anything heavy is imported.
"""

import json

from rs_transfer.options import whole


def add_command(commands) -> None:
    """The `models` and `info` subcommands on cli.py's subparsers."""
    models = commands.add_parser("models", help="the model zoo: layouts, params, GFLOPs, paper top-1, timm tags")
    models.add_argument("--json", action="store_true", help="print JSON for scripts")
    models.set_defaults(run=run_models)

    info = commands.add_parser("info", help="one model in detail (params and GFLOPs measured now)")
    info.add_argument("name", help="a model name, e.g. rs152, rs101-w1.5, resnet152-w2, efficientnet_b0")
    info.add_argument("--resolution", type=whole("--resolution", 1), action="append", help="GFLOPs at this size (repeatable)")
    info.add_argument("--num-classes", type=whole("--num-classes", 1), default=1000)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)


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
    from rs_transfer.models import family_of, zoo

    family = family_of(args.name)  # a bad name fails before torch and fvcore are imported (~3 s)
    if family.name != "resnet_rs":  # EfficientNet, a registered family: what any network has, no zoo layout
        return _print(family_info(args), args.json)
    spec = zoo.parse_name(args.name)
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
    return _print(result, args.json)


def family_info(args) -> dict:
    """`info` of a model of another family than the zoo's (models/registry.py): params, GFLOPs at --resolution
    (default 224) and, for a family with `features`, the feature extractor's channels and strides (else None)."""
    from rs_transfer.bench.flops import count_gflops
    from rs_transfer.models import create_model, family_of
    from rs_transfer.models.resnet_rs import count_params

    model = create_model(args.name, num_classes=args.num_classes)
    features = create_model(args.name, features_only=True) if hasattr(family_of(args.name).load(), "features") else None
    return {
        "name": args.name,
        "family": family_of(args.name).label,
        "params_m": round(count_params(model) / 1e6, 3),
        "gflops": {str(r): round(count_gflops(model, r), 2) for r in args.resolution or [224]},
        "feature_channels": features.feature_info.channels() if features is not None else None,
        "feature_strides": features.feature_info.reduction() if features is not None else None,
    }


def _print(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        print(f"{key:<18}{value}")
    return 0
