"""A fused model exports as its original architecture: ONNX (run in onnxruntime), torch.export, TorchScript."""

import pytest
import timm
import torch

import denoiserep as dr


def fused_model():
    model = timm.create_model("test_resnet", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    dr.convert(model, dr.DenoiseConfig(init="random"), example_inputs=x)
    return dr.fuse(model), x


def test_a_fused_model_exports_to_onnx_and_onnxruntime_computes_the_same(tmp_path):
    pytest.importorskip("onnxscript")  # the [export] extra: torch's ONNX exporter needs it
    onnxruntime = pytest.importorskip("onnxruntime")
    model, x = fused_model()
    torch.onnx.export(model, (x,), tmp_path / "model.onnx", dynamo=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(x), rtol=1e-4, atol=1e-5)


def test_a_fused_model_exports_with_torch_export_and_traces():
    model, x = fused_model()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), expected)
