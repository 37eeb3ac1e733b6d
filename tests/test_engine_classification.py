"""The engine's classification wrapper and top-k evaluator (engine/classification.py): what the model returns in
each mode, and top-1/top-5 counted by torchmetrics equal to counting by hand, on one process and on two gloo ranks
(also when a rank gets no sample)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from forked_ranks import run_ranks
from rs_transfer.engine import distributed
from rs_transfer.engine.classification import Classifier, TopKEvaluator
from rs_transfer.models.normalize import Normalize

CLASSES = 7


def toy_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, CLASSES)), label_smoothing=0.1)


def toy_samples(n: int, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 2, 2), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return [{"image": image, "label": label} for image, label in zip(images, labels)]


def by_hand(model: Classifier, samples: list) -> dict:
    """Top-1/top-5 as the evaluators counted them before torchmetrics: hits / samples in float64."""
    if not samples:
        return {}
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    with torch.no_grad():
        top = model.net(Normalize()(images)).topk(5, dim=1).indices
    hits = top == labels[:, None]
    return {"top1": hits[:, 0].sum().item() / len(labels), "top5": hits.any(1).sum().item() / len(labels)}


def test_train_mode_returns_losses_and_eval_mode_returns_logits():
    model = toy_classifier()
    batch = {"image": torch.stack([s["image"] for s in toy_samples(4)]),
             "label": torch.stack([s["label"] for s in toy_samples(4)])}
    logits = model.net(Normalize()(batch["image"]))
    out = model.train()(batch)
    assert set(out) == {"loss", "train_top1"}
    torch.testing.assert_close(out["loss"], nn.functional.cross_entropy(logits, batch["label"], label_smoothing=0.1))
    soft = torch.softmax(torch.randn(4, CLASSES), 1)
    out = model({"image": batch["image"], "target": soft})
    assert set(out) == {"loss"}
    torch.testing.assert_close(out["loss"], -(soft * logits.log_softmax(1)).sum(1).mean())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()({"image": batch["image"]}), logits)
    assert set(model.state_dict()) == {"net." + k for k in model.net.state_dict()}  # Normalize adds no key


@pytest.mark.parametrize("n", [1, 5, 23])
def test_topk_evaluator_counts_like_the_hand_count(n):
    model = toy_classifier().eval()
    samples = toy_samples(n)
    metrics = TopKEvaluator(samples, CLASSES, batch_size=4)(model)
    assert metrics == by_hand(model, samples)


def test_top5_of_fewer_than_five_classes_holds_every_class():
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3))).eval()
    samples = [{"image": s["image"], "label": s["label"] % 3} for s in toy_samples(9)]
    assert TopKEvaluator(samples, 3, batch_size=4)(model)["top5"] == 1.0


def write_rank_result(folder: Path) -> None:
    """In each forked rank: {n: what the evaluator returns for n samples} into FOLDER/rank{rank}.json."""
    info = distributed.init_distributed("cpu")
    results = {}
    for n in (1, 2, 7):  # with 1 sample rank 0 gets none; with 2 each gets one
        results[n] = TopKEvaluator(toy_samples(n), CLASSES, batch_size=2)(toy_classifier().eval())
    (folder / f"rank{info.rank}.json").write_text(json.dumps(results))


def test_two_gloo_ranks_give_every_rank_the_one_process_result(tmp_path):
    result = run_ranks(write_rank_result, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    model = toy_classifier().eval()
    for n in (1, 2, 7):
        expected = by_hand(model, toy_samples(n))
        assert [results[str(n)] for results in ranks] == [expected, expected], n


def test_topk_evaluator_keeps_its_workers_between_evaluations_until_closed():
    model = toy_classifier().eval()
    samples = toy_samples(23)
    evaluator = TopKEvaluator(samples, CLASSES, batch_size=4, num_workers=1)
    first = evaluator(model)
    workers = list(evaluator.loader._iterator._workers)
    assert evaluator(model) == first == by_hand(model, samples)
    assert evaluator.loader._iterator._workers == workers and all(w.is_alive() for w in workers)  # the same ones
    evaluator.close()
    assert evaluator.loader is None and not any(w.is_alive() for w in workers)
