"""CIFAR-100 transfer: the python pickles as distributed (`cifar-100-python/{train,test}`), images resized to
`task.image_size` (the paper: 256), a new linear head on the zoo classifier, top-1. The model and the evaluator
are the engine's classification ones (engine/classification.py).

data.root holds `cifar-100-python/` (or is it). Each pickle is a dict with byte-string keys (Python 2 wrote them;
str keys of a file re-saved by Python 3 are read too): b"data" (N x 3072 uint8, the R, G and B planes of 32x32
images) and b"fine_labels" (N ints in 0..99).

Unpickling can run any function a file names, so the pickles are read by `CifarUnpickler`, which builds only
dicts, lists, strings, bytes, numbers and numpy arrays; a file naming anything else is refused before it runs.

Importing this module imports no torch (the registry imports it to answer config and layout mistakes first): the
builders import torch, torchvision and the engine where they run.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

try:
    from numpy._core import multiarray, numeric  # numpy >= 2
except ImportError:
    from numpy.core import multiarray, numeric  # numpy 1.x

from rs_transfer.config import MAX_PIXELS, at_least, at_most, checked
from rs_transfer.downstream.config import FinetuneConfig, TaskSection, arch_args, check_num_classes
from rs_transfer.downstream.data import find_dir, require
from rs_transfer.downstream.protocol import Protocol
from rs_transfer.downstream.registry import TransferTaskDeclaration
from rs_transfer.downstream.scenes import COLOURS, background, shape_mask
from rs_transfer.errors import DataError
from rs_transfer.predictor import Predictor, read_image, write_top5

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2

    from rs_transfer.engine.classification import Classifier
    from rs_transfer.engine.task import Task

NUM_CLASSES = 100
# The fine label names of cifar-100-python/meta (b"fine_label_names"), in label order.
CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
PROTOCOL = Protocol("top1", (5000, 10000, 20000), 512, None, "CIFAR-100 acc", image_size=256)


@dataclass
class Cifar100Section(TaskSection):
    name: str = "cifar100"
    image_size: int = checked(256, at_least(1), at_most(MAX_PIXELS))  # images are resized to this (the paper: 256)
    # The paper's head has 101 outputs, the 100 classes plus a background class that is never a target; top-1 and
    # top-5 are then taken over all 101 (a background prediction is a miss). Off by default: a 100-way head is what
    # CIFAR-100 results usually mean (docs/downstream.md). On, set model.num_classes=101 too.
    background_class: bool = False


@dataclass
class Cifar100Config(FinetuneConfig):
    task: Cifar100Section = field(default_factory=Cifar100Section)


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); no other codec is needed.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR pickles hold. Python 2's cPickle wrote numpy.core.multiarray._reconstruct,
    numpy.ndarray and numpy.dtype for the b"data" array; numpy 2 writes numpy._core (and _frombuffer at protocol
    5, scalar for numpy integers in lists); Python 3 at protocol 2 writes bytes via _codecs.encode. Any other
    global (os.system, builtins.eval, ...) raises pickle.UnpicklingError before it is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR pickle never holds "
                                         "(refused, not run: the file may be crafted to run code)") from None


class _BoundedReader:
    """A file that refuses a read longer than what is left of it, before reading."""

    def __init__(self, file, size: int):
        self.file, self.left = file, size

    def read(self, n: int = -1) -> bytes:
        if n > self.left:
            raise pickle.UnpicklingError(f"it declares a value of {n} bytes where {self.left} are left in the file")
        data = self.file.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.file.readline(self.left)
        self.left -= len(line)
        return line


def check_declared_sizes(file, size: int) -> None:
    """Walk the pickle's opcodes (pickletools.genops, nothing built) and refuse one that declares more bytes than the
    file holds: the unpickler allocates a declared bytes object before reading it, so a few crafted bytes would
    otherwise ask for terabytes (MemoryError) or take the machine's memory. Rewinds `file`. Raises
    pickle.UnpicklingError."""
    import pickletools

    try:
        for _ in pickletools.genops(_BoundedReader(file, size)):
            pass
    except ValueError as error:  # genops' own "expected N bytes ... only M remain", a bad opcode
        raise pickle.UnpicklingError(str(error)) from None
    file.seek(0)


def _field(data, name: str):
    # Python 2 wrote byte-string keys; a file re-saved by Python 3 has str keys.
    if not isinstance(data, dict):
        raise TypeError(f"the pickle holds a {type(data).__name__}, not a dict")
    for key in (name.encode(), name):
        if key in data:
            return data[key]
    raise KeyError(name)


SPLITS = ("train", "test")  # the pickles a run reads: train, and test for evaluation


def pickle_path(root, split: str) -> Path:
    """data.root's cifar-100-python/`split` (data.root may be the cifar-100-python folder itself). Raises
    ConfigError when data.root is unset, DataError naming the folder or the pickle that is missing."""
    folder = find_dir(root, ("cifar-100-python", "."), "CIFAR-100 (a cifar-100-python folder)")
    return require(folder / split, f"the CIFAR-100 python pickle '{split}' (from cifar-100-python.tar.gz)")


def check_data(config) -> None:
    """TransferTaskDeclaration.check_data: both pickles are where `build` reads them (their contents are checked when
    read). Raises ConfigError for an unset data.root, DataError naming what is missing."""
    for split in SPLITS:
        pickle_path(config.data.root, split)


def read_cifar(root, split: str) -> tuple:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..99) of cifar-100-python/`split`.

    Raises DataError naming the file when it is missing, not a CIFAR-100 pickle, or names any function or
    class beyond `CifarUnpickler.ALLOWED` (nothing it names is called)."""
    path = pickle_path(root, split)
    try:
        with open(path, "rb") as f:
            check_declared_sizes(f, path.stat().st_size)
            data = CifarUnpickler(f, encoding="bytes").load()
        pixels, labels = _field(data, "data"), _field(data, "fine_labels")
        # The file says what they are before numpy builds anything: a crafted list of lists (a few bytes of pickle
        # memo references) would make np.asarray allocate gigabytes or fail with a MemoryError
        if not isinstance(pixels, np.ndarray):
            raise TypeError(f"'data' is a {type(pixels).__name__}, not an array")
        if not (isinstance(labels, (list, np.ndarray)) and all(isinstance(v, (int, np.integer)) for v in labels)):
            raise TypeError("'fine_labels' is not a list of integers")
        labels = np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
            RecursionError) as error:
        raise DataError(f"{path} is not a CIFAR-100 pickle with 'data' (N x 3072) and 'fine_labels': "
                           f"{type(error).__name__}: {error}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {pixels.dtype} {pixels.shape}: expected uint8 N x 3072")
    if len(labels) == 0 or len(pixels) != len(labels) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: {len(pixels)} images, {len(labels)} labels in "
                           f"{labels.min(initial=0)}..{labels.max(initial=0)}: expected one label in 0..99 per image")
    return pixels.reshape(-1, 3, 32, 32), labels


class Cifar100:
    """A map-style dataset (torch.utils.data's protocol: `__getitem__` and `__len__`, which DataLoader and the engine
    need; no torch base class, so this module imports without torch): {"image": uint8 (3, S, S), "label": int64}."""

    def __init__(self, root, split: str, transform):
        self.images, self.labels = read_cifar(root, split)
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        import torch
        from torchvision import tv_tensors

        image = self.transform(tv_tensors.Image(torch.from_numpy(self.images[index])))
        return {"image": image.as_subclass(torch.Tensor), "label": torch.tensor(self.labels[index])}


def transforms(image_size: int, train: bool) -> v2.Compose:
    from torchvision.transforms import v2

    steps = [v2.Resize((image_size, image_size), antialias=True)]  # a no-op at 32
    return v2.Compose(steps + [v2.RandomHorizontalFlip()] if train else steps)


def head_outputs(config) -> int:
    """100, or 101 with task.background_class (the paper's head; class 100 is background, never a label)."""
    return NUM_CLASSES + 1 if config.task.background_class else NUM_CLASSES


def build_model(config) -> Classifier:
    """The zoo classifier with 100 outputs (101 with task.background_class) in engine.classification.Classifier
    (eval mode: logits (N, outputs)), from model.* alone. Raises ConfigError for a model.num_classes other than the
    head's outputs, WeightsError for model.weights that do not fit."""
    from rs_transfer.engine.classification import Classifier
    from rs_transfer.models import create_model

    outputs = head_outputs(config)
    check_num_classes(config, outputs)
    net = create_model(config.model.name, num_classes=outputs, weights=config.model.weights,
                       **arch_args(config))
    return Classifier(net, label_smoothing=config.train.label_smoothing)


def predict(model, config, image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> class probabilities (100,): resized to task.image_size as the evaluator does. With
    task.background_class the softmax is over all 101 outputs and the background's share is left out."""
    import torch
    from torchvision import tv_tensors

    from rs_transfer.engine.device import model_device

    batch = transforms(config.task.image_size, train=False)(tv_tensors.Image(image))[None]
    logits = model({"image": batch.as_subclass(torch.Tensor).to(model_device(model))})
    return logits[0].float().softmax(0)[:NUM_CLASSES].cpu()


def build(config) -> Task:
    """The cifar100 Task (engine/task.py) from its run config: the python pickles under data.root (50k train, 10k
    test), images resized to task.image_size (uint8 (3, S, S)), the zoo classifier with 100 outputs, or 101 with
    task.background_class (engine.classification.Classifier; eval mode: logits (N, 100 or 101)), top-1/top-5 on the
    test set over every output (fractions). Raises DataError for missing or malformed pickles, ConfigError for a
    model.num_classes other than the head's outputs, WeightsError for model.weights that do not fit."""
    from rs_transfer.engine.classification import TopKEvaluator
    from rs_transfer.engine.task import Task

    task_cfg = config.task
    outputs = head_outputs(config)
    train_set = Cifar100(config.data.root, "train", transforms(task_cfg.image_size, train=True))
    val_set = Cifar100(config.data.root, "test", transforms(task_cfg.image_size, train=False))
    model = build_model(config)
    evaluate = TopKEvaluator(val_set, outputs, task_cfg.eval_batch_size, config.data.num_workers)
    return Task(model=model, train_set=train_set, evaluate=evaluate, primary_metric=PROTOCOL.metric)


SYNTHETIC_CLASSES = tuple(range(0, 100, 10))  # the fine labels synthetic images use; class k gets COLOURS[k]


def write_cifar100(root, train=400, test=100, seed=0) -> Path:
    """cifar-100-python/{train,test,meta}: pickles of dicts with byte-string keys, rows of 3072 uint8 (RGB planes)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = [SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)] for i in range(count)]
        rows = []
        for label in labels:
            k = SYNTHETIC_CLASSES.index(label)
            image = background(rng, 32, 32)
            mask, _ = shape_mask(rng, 32, 32, 0.4, 0.8)
            image[mask] = COLOURS[k] + rng.normal(0, 10, size=(int(mask.sum()), 3))
            rows.append(np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1).reshape(-1))
        data = {
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": np.stack(rows),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(data, f, protocol=2)
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def write_synthetic(root, train: int, val: int):
    return write_cifar100(root, train=train, test=val)


# predict: top-5 classes with their probabilities per image (rs_transfer/predictor.py)
PREDICTOR = Predictor(read=read_image, predict=predict, write=write_top5,
                      class_names=lambda config: (CLASSES, "the CIFAR-100 fine label names"))

TASK = TransferTaskDeclaration(
    name="cifar100", config=Cifar100Config, build=build, protocol=PROTOCOL, write_synthetic=write_synthetic,
    build_model=build_model, predictor=PREDICTOR, check_data=check_data,
    # Table 5, percent: (backbone, method, pretraining epochs) -> value
    paper={("R152", "supervised", 90): 85.5, ("R152", "SimCLR", 800): 87.1, ("R152", "SimCLRv2", 800): 84.7,
           ("R152", "RS", 400): 88.1, ("R152 2x", "supervised", 90): 86.6, ("R152 2x", "SimCLR", 800): 89.0,
           ("R152 2x", "SimCLRv2", 800): 84.8, ("R152 2x", "RS", 400): 89.3},
)
