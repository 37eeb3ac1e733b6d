"""`rs-transfer finetune`, `sweep` and `demo`: the transfer tasks' parsers and handlers (the work is in finetune.py).

Torch-free at import: the task names come from registry.py, which imports no task module.
"""

import json

from rs_transfer.downstream.registry import names  # task names only: no task module (nor torch) is imported
from rs_transfer.options import CONFIG_HELP, RESUME_HELP, out_path, positive_list, whole, with_resume


def add_command(commands) -> None:
    """The `finetune`, `sweep` and `demo` subcommands on cli.py's subparsers."""
    tasks = names()
    for name, help_text in (("finetune", "fine-tune a backbone on a transfer task (one point of the grid)"),
                            ("sweep", "run a task's LR x steps grid (or one point of it) and pick the best")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--task", required=True, choices=tasks)
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
    demo.add_argument("--task", default="pascal_seg", choices=tasks)
    demo.add_argument("--data", type=out_path("--data"), help="folder for the generated dataset (default: a temporary folder)")
    demo.add_argument("--output", type=out_path("--output"), help="run folder (default: a temporary folder)")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    demo.set_defaults(run=run_demo)


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


def run_demo(args) -> int:
    from rs_transfer.downstream.finetune import demo

    demo(args.task, args.data, args.output, args.overrides)
    return 0
