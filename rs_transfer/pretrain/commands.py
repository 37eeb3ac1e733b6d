"""`rs-transfer index`, `pretrain` and `pseudo-label`: the pretraining family's parsers and handlers.

Standard library only at import (the handlers import the work: run.py, pseudo_label.py, shards.py), so
`rs-transfer --help` stays torch-free.
"""

import os

from rs_transfer.options import CONFIG_HELP, RESUME_HELP, out_path, real, whole, with_resume


def add_command(commands) -> None:
    """The `index`, `pretrain` and `pseudo-label` subcommands on cli.py's subparsers."""
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


def run_index(args) -> int:
    from rs_transfer.pretrain.shards import write_index

    path = write_index(args.folder, workers=args.workers)
    print(path)
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
