"""Real architectures (random init, no downloads): convert → train a few steps → fuse.

For each: fused == unfused in eval mode, the original state_dict keys and shapes, a strict
load into a freshly built original model, tracing/export, and FLOPs equal to the original's.
"""

import copy
import warnings

import pytest
import timm
import torch
import torchvision

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.timing import forward_flops
from conftest import relative_error

ARCHITECTURES = {
    "timm/vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5), 64),
    "timm/resnet18": (lambda: timm.create_model("resnet18", num_classes=5), 64),
    "timm/convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=5), 64),
    "timm/swinv2_cr_tiny_ns_224": (lambda: timm.create_model("swinv2_cr_tiny_ns_224", img_size=(128, 128), window_size=4, embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 2), num_classes=5), 128),
    "torchvision/resnet18": (lambda: torchvision.models.resnet18(num_classes=5), 64),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_convert_train_fuse_on_a_real_architecture(arch):
    build, size = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = build()
    original = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, size, size)
    # Swin's patch-merging `reduction` layers are bias-free with a LayerNorm after them: by default
    # (keep_state_dict_keys=True) they are left out, so that the fused weights load strictly.
    config = DenoiseConfig(init="random", schedule="ddpm", timestep_range=(1, 1000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dr.convert(model, config, example_inputs=x)
    skipped = [str(w.message) for w in caught if "keep_state_dict_keys" in str(w.message)]
    assert bool(skipped) == ("swin" in arch)
    assert len(list(dr.layer_denoisers(model))) > 0

    dr.set_trainable(model)
    optimizer = torch.optim.AdamW(dr.denoiser_parameters(model), lr=1e-3)
    model.train()
    for _ in range(2):
        loss = 0.5 * model(x).logsumexp(-1).mean() + 0.5 * dr.denoise_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        unfused = model(x)
    dr.fuse(model)
    with torch.no_grad():
        fused = model(x)
    error = relative_error(fused, unfused)
    print(f"{arch}: max relative error fused vs unfused = {error:.2e}")
    assert error <= 1e-5

    assert list(model.state_dict()) == list(original.state_dict())
    assert all(v.shape == original.state_dict()[k].shape for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    fresh = build()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused)

    traced = torch.jit.trace(model, x[:1], check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)
    assert forward_flops(model, x) == forward_flops(original, x)


def test_fused_model_exports_with_torch_export():
    model = timm.create_model("resnet18", num_classes=5)
    x = torch.randn(1, 3, 32, 32)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.fuse(model.eval())
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_fused_model_compiles():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.fuse(model.eval())
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
