"""`rs-transfer bench SUBCOMMAND`: every benchmark's parser and handler (the measuring is in this package's modules).

A new benchmark is a module here plus its `bench_commands.add_parser(...)` block in `add_command` below: nothing
outside bench/ changes. Standard library only at import (the handlers import the bench modules, which import
torch), so `rs-transfer --help` stays torch-free.
"""

import json

from rs_transfer.options import Parser, out_path, real, whole


def add_command(commands) -> None:
    """The `bench` subcommand and its benchmarks on cli.py's subparsers."""
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


def run_bench_data(args) -> int:
    from rs_transfer.bench.data import bench_dali_feeder, bench_data, print_dali_report, print_report

    if args.backend == "dali":
        print_dali_report(bench_dali_feeder(args.images, args.count, args.resolution, args.magnitude, args.seconds),
                          args.json)
        return 0
    print_report(bench_data(args.images, args.count, args.resolution, args.magnitude, args.seconds), args.json)
    return 0


def run_bench_index(args) -> int:
    from rs_transfer.bench.index import bench_index

    print(json.dumps(bench_index(args.samples, args.shards, args.world, args.topk, args.work_dir)))
    return 0


def run_bench_video_data(args) -> int:
    from rs_transfer.bench.video_data import run_cli

    return run_cli(args)
