"""`rs-transfer export --run RUN --format onnx|torchscript|pt2`: the parser and handler of export.py's command.

Apart from export.py because that module imports torch (its wrappers are nn.Modules), and every parser stays
torch-free so that `rs-transfer --help` starts fast.
"""

import json

from rs_transfer.options import add_run_option, out_path, whole


def add_command(commands) -> None:
    """The `export` subcommand on cli.py's subparsers."""
    export = commands.add_parser("export", help="a trained run's network as ONNX, TorchScript or a torch.export "
                                 "program, checked against PyTorch")
    add_run_option(export)
    export.add_argument("--format", required=True, choices=("onnx", "torchscript", "pt2"),
                        help="onnx needs the export extra: pip install 'rs-transfer[export]'")
    export.add_argument("--resolution", type=whole("--resolution", 1), help="input height and width (default: the run's evaluation size)")
    export.add_argument("--out", type=out_path("--out"), help="output file, or an existing folder for FOLDER/model.<ext> "
                        "(default RUN/export/model.onnx|.ts|.pt2)")
    export.set_defaults(run=run_command)


def run_command(args) -> int:
    from rs_transfer.export import export_run

    result = export_run(args.run_dir, args.format, args.out, args.resolution)
    print(json.dumps({"path": str(result.path), "format": result.format, "max_abs_diff": result.max_abs_diff}))
    return 0
