"""`rs-transfer video train` and `video eval`: the video family's parsers and handlers (the work is in run.py).

Standard library only at import, so `rs-transfer --help` stays torch-free.
"""

import json

from rs_transfer.options import CONFIG_HELP, RESUME_HELP, whole, with_resume


def add_command(commands) -> None:
    """The `video` subcommand and its actions on cli.py's subparsers."""
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


def run_video_train(args) -> int:
    from rs_transfer.video.run import run_train

    print(json.dumps(run_train(args.config, with_resume(args))))
    return 0


def run_video_eval(args) -> int:
    from rs_transfer.video.run import run_eval

    print(json.dumps(run_eval(args.checkpoint, args.views, args.config, args.overrides)))
    return 0
