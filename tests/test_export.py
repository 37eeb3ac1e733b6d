"""rs_transfer/export.py: ONNX (run back with ONNX Runtime), TorchScript and torch.export programs match PyTorch,
and an export that does not match is refused without leaving a file."""

import warnings

import pytest
import torch

from rs_transfer import export
from rs_transfer.models import create_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("rs26-w0.25", num_classes=10, init="timm").eval()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_every_format_reloads_and_matches_pytorch_on_other_inputs(net, fmt, tmp_path):
    out = tmp_path / f"net{export.FORMATS[fmt]}"
    result = export.export_module(net, torch.randn(2, 3, 64, 64), fmt, out)
    assert result.path == out and out.is_file() and result.max_abs_diff <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp or side files left
    images = torch.randn(3, 3, 64, 64)  # another batch size: the batch dimension is dynamic (traced for torchscript)
    with torch.no_grad():
        expected = net(images)
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        elif fmt == "pt2":
            got = torch.export.load(str(out)).module()(images)
        else:
            with warnings.catch_warnings():  # torch.jit is deprecated; loading is what a TorchScript user does
                warnings.simplefilter("ignore", FutureWarning)
                got = torch.jit.load(str(out))(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_no_file(net, tmp_path, monkeypatch):
    def wrong(module, example, path):
        path.write_bytes(b"not a model")
        return lambda inputs: module(inputs) + 0.5

    monkeypatch.setitem(export._WRITERS, "pt2", wrong)
    with pytest.raises(export.ExportError, match=r"pt2 export differs from PyTorch by up to 0.5"):
        export.export_module(net, torch.randn(2, 3, 32, 32), "pt2", tmp_path / "net.pt2")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'"):
        export.export_module(net, torch.randn(1, 3, 32, 32), "tflite", tmp_path / "net.tflite")
