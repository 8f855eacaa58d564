"""The Python API a PEFT user looks for: what a frozen backbone means, task heads, the conversion summary,
adapter-only checkpoints, unload, disable_adapter, print_trainable_parameters, Hugging Face save_pretrained."""

import copy

import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from torchvision.models.convnext import CNBlockConfig
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.convert import WOULD_GAIN_A_BIAS


def small_resnet():
    return timm.create_model("test_resnet", num_classes=5)  # timm's smallest ResNet: convs, BatchNorms, fc


def resnet_and_batch():
    torch.manual_seed(0)
    return small_resnet(), torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))


def train_steps(model, x, y, steps=3):
    optimizer = torch.optim.SGD(dr.denoiser_parameters(model), lr=1e-2)
    model.train()  # as the README's loop (and Lightning, and HF's Trainer) call it
    for _ in range(steps):
        loss = 0.5 * nn.functional.cross_entropy(model(x), y) + 0.5 * dr.denoise_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def norm_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


# -- a frozen backbone --------------------------------------------------------------------------------

def test_set_trainable_freezes_the_batchnorm_statistics_even_in_train_mode():
    model, x, y = resnet_and_batch()
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.set_trainable(model)
    before = norm_buffers(model)
    train_steps(model, x, y)
    after = norm_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the model is in train mode; only its frozen norms run as at inference


def test_norm_statistics_update_when_asked_or_when_the_backbone_trains():
    for kwargs in ({"norm_statistics": True}, {"backbone": True}):
        model, x, y = resnet_and_batch()
        dr.convert(model, example_inputs=x)
        dr.set_trainable(model, **kwargs)
        before = norm_buffers(model)
        train_steps(model, x, y, steps=1)
        assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean), kwargs


def test_a_fused_model_made_trainable_again_updates_its_statistics_as_usual():
    model, x, y = resnet_and_batch()
    dr.convert(model, example_inputs=x)
    dr.set_trainable(model)
    dr.fuse(model.eval())
    model.requires_grad_(True)
    before = norm_buffers(model)
    model.train()
    model(x).sum().backward()
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)


# -- task heads and the conversion summary ----------------------------------------------------------------

@pytest.mark.parametrize("build, head", [
    (lambda: torchvision.models.resnet18(num_classes=3), "fc"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "classifier"),
    (lambda: torchvision.models.VisionTransformer(32, 16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                                                  num_classes=3), "heads"),  # vit_b_16's class, smaller
    (lambda: torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=3),
     "classifier"),
])
def test_exclude_classifier_recognises_torchvision_heads(build, head):
    model = build()
    _, state = dr.convert(model, example_inputs=torch.randn(1, 3, 32, 32), return_report=True)
    converted = {p.name for p in state.plan}
    assert converted and not any(name == head or name.startswith(head + ".") for name in converted)
    left_out = {e.name: e.reason for e in state.left_out}
    assert any(name.startswith(head) and "task head" in reason for name, reason in left_out.items())
    assert f"the task head `{head}`" in dr.conversion_summary(model)


def hf_models():
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    segformer = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                             hidden_sizes=[16, 32], num_attention_heads=[1, 2], decoder_hidden_size=32,
                                             num_labels=4)
    return {
        "vit": (transformers.ViTForImageClassification(vit), ["classifier"]),
        "segformer": (transformers.SegformerForSemanticSegmentation(segformer), ["decode_head"]),
    }


@pytest.mark.parametrize("name", ["vit", "segformer"])
def test_exclude_classifier_recognises_hugging_face_task_heads(name):
    model, heads = hf_models()[name]
    _, state = dr.convert(model, example_inputs=torch.randn(1, 3, 32, 32), return_report=True)
    assert not any(p.name.startswith(tuple(heads)) for p in state.plan)
    assert all(any(e.name.startswith(h) and "task head" in e.reason for e in state.left_out) for h in heads)


def test_the_summary_says_what_was_converted_and_why_the_rest_was_left_out():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    model = Net()
    with pytest.warns(UserWarning):
        dr.convert(model, DenoiseConfig(exclude_modules=["b"]), example_inputs=torch.randn(2, 4))
    summary = dr.conversion_summary(model)
    assert "converted 1 layers: a (t=1)" in summary
    assert "b: not selected by target_modules / exclude_modules" in summary
    assert "spare: never ran on example_inputs" in summary


# -- frozen BatchNorms of any kind --------------------------------------------------------------------------

class SameBuffersNorm(nn.Module):
    """A frozen BatchNorm of no known class: the four per-channel tensors and the eval formula."""

    def __init__(self, channels):
        super().__init__()
        for key, value in (("weight", torch.rand(channels) + 0.5), ("bias", torch.randn(channels)),
                           ("running_mean", torch.randn(channels)), ("running_var", torch.rand(channels) + 0.5)):
            self.register_buffer(key, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def test_any_module_with_batchnorms_buffers_absorbs_the_constant():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), SameBuffersNorm(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    assert report.layers[0].bias == "folded into 1" and report.added_biases == [] and report.skipped == []
    assert report.max_relative_error < 1e-5


def test_a_stock_hugging_face_detr_folds_into_its_frozen_batchnorms_and_loads_strictly():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False,
                                     num_labels=3, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                     encoder_attention_heads=2, decoder_attention_heads=2)
    model = transformers.DetrForObjectDetection(config).eval()
    original = copy.deepcopy(model)
    x = {"pixel_values": torch.randn(1, 3, 64, 64)}
    _, state = dr.convert(model, DenoiseConfig(init="random"), example_inputs=x, return_report=True)
    assert not any(e.reason == WOULD_GAIN_A_BIAS for e in state.left_out)
    assert {"class_labels_classifier", "bbox_predictor"} <= {e.name.split(".")[0] for e in state.left_out}
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    folded = [layer for layer in report.layers if layer.bias.startswith("folded into")]
    assert len(folded) == 20 and all("backbone" in layer.name for layer in folded)  # ResNet-18's 20 convs
    assert report.added_biases == [] and report.skipped == [] and report.max_relative_error < 1e-4
    original.load_state_dict(model.state_dict(), strict=True)


# -- PEFT parity --------------------------------------------------------------------------------------------

def test_print_trainable_parameters_reports_like_peft(capsys):
    model, x, _ = resnet_and_batch()
    dr.convert(model, example_inputs=x)
    dr.set_trainable(model)
    counts = dr.trainable_parameters(model)
    dr.print_trainable_parameters(model)
    first, second = capsys.readouterr().out.splitlines()
    denoisers = sum(p.numel() for p in dr.denoiser_parameters(model))
    assert counts["trainable"] == counts["denoisers"] == denoisers
    assert counts["total"] == denoisers + sum(p.numel() for p in small_resnet().parameters())
    assert first == (f"trainable params: {denoisers:,} || all params: {counts['total']:,} || "
                     f"trainable%: {100 * denoisers / counts['total']:.4f}")
    layers = len(list(dr.layer_denoisers(model)))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert f"denoisers of {layers} layers" in second and f"running statistics of {norms} norms frozen" in second


def test_an_adapter_checkpoint_holds_only_the_denoisers_and_the_plan_in_safetensors(tmp_path):
    model, x, y = resnet_and_batch()
    backbone = copy.deepcopy(model.state_dict())
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.set_trainable(model)
    train_steps(model, x, y, steps=1)
    path = dr.save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["format"] == "denoiserep-adapter/1" and "conversions" in metadata
    assert keys == {f"{n}.{k}" for n, _, d in dr.layer_denoisers(model) for k in d.state_dict()}
    fresh = small_resnet()
    fresh.load_state_dict(backbone)
    dr.load_adapter(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_an_adapter_for_another_architecture_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    model, x, _ = resnet_and_batch()
    dr.convert(model, example_inputs=x)
    dr.save_adapter(model, tmp_path)  # a directory gets denoiserep_adapter.safetensors
    other = torchvision.models.mobilenet_v3_small(num_classes=5)
    keys = list(other.state_dict())
    with pytest.raises(ValueError, match="does not match this model's denoisers|does not have"):
        dr.load_adapter(other, tmp_path)
    assert not dr.is_converted(other) and list(other.state_dict()) == keys
    dr.save_fused(small_resnet(), tmp_path / "fused.safetensors")
    with pytest.raises(ValueError, match="not a denoiserep adapter file"):
        dr.load_adapter(small_resnet(), tmp_path / "fused.safetensors")


def test_unload_removes_the_denoisers_without_fusing():
    model, x, y = resnet_and_batch()
    original = copy.deepcopy(model).eval()
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.unload(model)
    assert not dr.is_converted(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert list(model.state_dict()) == list(original.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))
    dr.convert(model, example_inputs=x)  # and it can be converted again


def test_disable_adapter_runs_the_original_model_for_the_block_only():
    model, x, _ = resnet_and_batch()
    original = copy.deepcopy(model).eval()
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    dr.set_trainable(model)
    model.eval()
    with torch.no_grad():
        denoised = model(x)
        with dr.disable_adapter(model):
            assert torch.equal(model(x), original(x))
        assert torch.equal(model(x), denoised)
    model.train()
    with dr.disable_adapter(model):
        model(x)  # a training forward: no noise loss is accumulated inside the block
    with pytest.raises(RuntimeError, match="no noise loss"):
        dr.denoise_loss(model)


# -- Hugging Face save_pretrained -----------------------------------------------------------------------------

def test_save_pretrained_of_a_converted_model_reloads_the_backbone_exactly_and_the_adapter_beside_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = hf_models()["vit"]
    model.eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs={"pixel_values": x})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "denoiserep_adapter.safetensors").exists()
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        # Not one weight re-initialised: the original model, exactly.
        assert torch.equal(reloaded(pixel_values=x).logits, original(pixel_values=x).logits)
        dr.load_adapter(reloaded, tmp_path)
        torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)

    # What Trainer(resume_from_checkpoint=…) does: load model.safetensors into the converted model.
    from safetensors.torch import load_file

    resumed = copy.deepcopy(original)
    dr.convert(resumed, example_inputs={"pixel_values": x})
    result = resumed.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(resumed(pixel_values=x).logits, model(pixel_values=x).logits)

    dr.fuse(model)  # fused: plain save_pretrained, the original architecture with the trained weights
    model.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused" / "denoiserep_adapter.safetensors").exists()
    fused = transformers.ViTForImageClassification.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=x).logits, model(pixel_values=x).logits)
