"""`rs-transfer config show COMMAND ...`: the config a training command would run with, printed as YAML.

Apart from config.py because that module imports the config system (omegaconf), and every parser stays light so
that `rs-transfer --help` starts fast. The handler parses COMMAND with the whole CLI's parser (cli.build_parser),
so its options, overrides and errors are exactly the command's.
"""

import argparse

from rs_transfer.errors import UserError


def add_command(commands) -> None:
    """The `config show` subcommand on cli.py's subparsers."""
    show = commands.add_parser("config", help="the resolved config of a training command, without running it")
    show_commands = show.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    shown = show_commands.add_parser("show", help="print the config that COMMAND would run with, as YAML, e.g. "
                                     "`rs-transfer config show finetune --task pascal_seg --backbone rs152`")
    shown.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                       help="finetune | sweep | pretrain | video train, with its options and key=value overrides")
    shown.set_defaults(run=run_config_show)


def run_config_show(args) -> int:
    """The config a training command would run with: its file, options and overrides resolved and checked (a typo
    or bad value is the same error line as the command's). No torch is imported: pretraining's and video's schemas
    and the transfer task modules import none."""
    import yaml

    from rs_transfer.cli import build_parser  # the whole CLI: imported here, as cli.py imports this module
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
