"""`timm:NAME.TAG` weights resolved offline in a Hugging Face cache folder the test builds (rs_transfer/models/hub.py)."""

from pathlib import Path

import pytest
import torch

from rs_transfer.models import hub
from rs_transfer.models.weights import WeightsError


def hf_cache(root: Path, repo_id: str, filename: str, state_dict: dict, revision: str = "0123abcd") -> Path:
    """The Hugging Face hub cache layout: models--ORG--NAME/refs/main holds the revision, the file is under
    snapshots/REVISION/ (huggingface_hub's file_download.py)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, str(snapshot / filename))
    else:
        torch.save(state_dict, snapshot / filename)
    return snapshot / filename


def test_a_timm_tag_resolves_to_the_cached_file(tmp_path):
    state = {"conv1.weight": torch.randn(2, 3, 1, 1)}
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors", state)
    assert hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path) == cached
    assert hub.resolve("timm:resnetrs50", cache_dir=tmp_path) == cached  # timm's default tag for the model
    assert hub.resolve(str(cached)) == cached  # a path stays a path


def test_the_pickle_file_is_found_when_there_is_no_safetensors(tmp_path):
    cached = hf_cache(tmp_path, "timm/resnetrs101.tf_in1k", "pytorch_model.bin", {"w": torch.zeros(1)})
    assert hub.resolve("timm:resnetrs101.tf_in1k", cache_dir=tmp_path) == cached


def test_a_cache_copied_without_refs_is_found_by_its_snapshot(tmp_path):
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors", {"w": torch.zeros(1)})
    (cached.parents[2] / "refs" / "main").unlink()  # `cp -r snapshots/` or a tar of the files alone
    assert hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path) == cached
    second = cached.parents[1] / "fedcba98" / "model.safetensors"
    second.parent.mkdir()
    second.write_bytes(cached.read_bytes())
    with pytest.raises(WeightsError, match=r"has no refs/main for timm/resnetrs50.tf_in1k and 2 snapshots hold its "
                                           r"weights .*: give the path of one"):
        hub.resolve("timm:resnetrs50.tf_in1k", cache_dir=tmp_path)


def test_uncached_unknown_and_bad_tags_are_one_clear_error(tmp_path):
    with pytest.raises(WeightsError, match=r"timm:resnetrs152.tf_in1k: not in the Hugging Face cache .*"
                                           r"timm/resnetrs152.tf_in1k.*create_model\('resnetrs152.tf_in1k', pretrained=True\)"):
        hub.resolve("timm:resnetrs152.tf_in1k", cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="Invalid pretrained tag.*rs-transfer models"):
        hub.resolve("timm:resnetrs152.no_such_tag", cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="timm has no pretrained weights named 'no_such_model'"):
        hub.resolve("timm:no_such_model", cache_dir=tmp_path)


def test_loading_by_tag_gives_the_same_model_as_loading_the_file(tmp_path, monkeypatch):
    import huggingface_hub

    from rs_transfer.models import create_model
    from rs_transfer.models.weights import load_weights

    source = create_model("rs26-w0.25", num_classes=10)
    cached = hf_cache(tmp_path, "timm/resnetrs50.tf_in1k", "model.safetensors",
                      {k: v.contiguous() for k, v in source.state_dict().items()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    by_path = load_weights(create_model("rs26-w0.25", num_classes=10), cached, new_classifier=False).eval()
    by_tag = load_weights(create_model("rs26-w0.25", num_classes=10), "timm:resnetrs50.tf_in1k",
                          new_classifier=False).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_tag(images), by_path(images))
        assert torch.equal(by_tag(images), source.eval()(images))
    with pytest.raises(WeightsError, match="timm:resnetrs101.tf_in1k: not in the Hugging Face cache"):
        load_weights(create_model("rs26-w0.25", num_classes=10), "timm:resnetrs101.tf_in1k")
    # what configs (`model.weights: timm:...`) and `--weights` reach: create_model's weights argument
    built = create_model("rs26-w0.25", num_classes=10, weights="timm:resnetrs50.tf_in1k").eval()
    with torch.no_grad():
        assert torch.equal(built(images), by_path(images))


def test_an_empty_timm_name_reaches_resolve_as_a_string(tmp_path):
    # `--weights timm:` became the override model.weights=timm:, which YAML read as a dict {'timm': None}
    from rs_transfer.downstream import finetune

    config = finetune.make_config("cifar100", weights="timm:", overrides=[f"data.root={tmp_path}"])
    assert config.model.weights == "timm:"
    with pytest.raises(WeightsError, match="no weights name after timm:"):
        finetune.check_model(config)
    odd = str(tmp_path / "a:b {c}' d.pth")
    assert finetune.make_config("cifar100", weights=odd).model.weights == odd
