"""convert / fuse behaviour: selection, execution order, timesteps, errors, determinism."""

import copy

import pytest
import torch
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig


class RegisteredBackwards(nn.Module):
    """Registration order (late, early, head) differs from execution order (early, late, head)."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(8, 8)
        self.early = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.late(torch.relu(self.early(x)))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.proj = nn.Conv2d(6, 4, 1, bias=False)  # no BatchNorm after it

    def forward(self, x):
        return self.proj(torch.relu(self.bn(self.conv(x))))


def timesteps(model):
    return {name: d.timestep for name, _, d in dr.layer_denoisers(model)}


def test_timesteps_follow_execution_order_not_registration_order():
    model = RegisteredBackwards()
    dr.convert(model, example_inputs=torch.randn(2, 4))
    # t_i = N − i + 1 over execution order: early runs first and is the noisiest.
    assert timesteps(model) == {"early": 3, "late": 2, "head": 1}


def test_without_example_inputs_registration_order_is_used_and_the_user_is_told_how_to_fix_it():
    model = RegisteredBackwards()
    with pytest.warns(UserWarning, match="Pass example_inputs"):
        dr.convert(model)
    assert timesteps(model) == {"late": 3, "early": 2, "head": 1}


def test_timestep_range_spreads_layers_over_the_schedule():
    model = RegisteredBackwards()
    dr.convert(model, DenoiseConfig(schedule="ddpm", timestep_range=(1, 1000)), example_inputs=torch.randn(1, 4))
    assert timesteps(model) == {"early": 1000, "late": 500, "head": 1}


def test_target_and_exclude_patterns_select_layers_like_peft():
    model = RegisteredBackwards()
    dr.convert(model, DenoiseConfig(target_modules=["early", "la*"], exclude_modules="late"), example_inputs=torch.randn(1, 4))
    assert set(timesteps(model)) == {"early"}


def test_timm_classifier_is_left_alone_by_default():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=1)
    dr.convert(model, example_inputs=torch.randn(1, 3, 32, 32))
    names = set(timesteps(model))
    assert "head" not in names and "blocks.0.attn.qkv" in names and "patch_embed.proj" in names


def test_identity_init_leaves_the_model_unchanged_before_training():
    model = ConvBN().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, example_inputs=x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-6)


def test_bias_free_conv_folds_into_the_following_batchnorm_and_otherwise_gains_a_bias():
    model = ConvBN()
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, DenoiseConfig(init="random", keep_state_dict_keys=False), example_inputs=x)
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    how = {layer.name: layer.bias for layer in report.layers}
    assert how == {"conv": "folded into bn", "proj": "added"}
    assert report.added_biases == ["proj"]
    assert model.conv.bias is None and model.proj.bias is not None
    assert report.max_relative_error < 1e-5


def test_a_frozen_batchnorm_absorbs_the_constant_like_a_batchnorm():
    from torchvision.ops.misc import FrozenBatchNorm2d  # what torchvision's detectors use

    model = ConvBN()
    model.bn = FrozenBatchNorm2d(6)
    model.bn.running_mean.normal_()
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    assert report.layers[0].bias == "folded into bn"
    assert model.conv.bias is None and report.max_relative_error < 1e-5


def test_fusing_a_parent_after_converting_a_submodule_finds_the_submodules_batchnorms():
    detector = nn.Sequential()
    detector.backbone = ConvBN()
    detector.head = nn.Conv2d(4, 2, 1)
    x = torch.randn(2, 3, 8, 8)
    dr.convert(detector.backbone, DenoiseConfig(init="random", keep_state_dict_keys=False), example_inputs=x)
    _, report = dr.fuse(detector, example_inputs=x, return_report=True)
    how = {layer.name: layer.bias for layer in report.layers}
    assert how == {"backbone.conv": "folded into backbone.bn", "backbone.proj": "added"}
    assert report.max_relative_error < 1e-5


def test_by_default_layers_that_would_gain_a_bias_are_skipped_so_fused_weights_load_strictly():
    model = ConvBN()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="keep_state_dict_keys=True.*proj"):
        _, state = dr.convert(model, DenoiseConfig(init="random"), example_inputs=x, return_report=True)
    assert set(timesteps(model)) == {"conv"}
    assert "proj: bias-free with no BatchNorm" in state.summary()
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    assert report.skipped == ["proj"] and report.added_biases == []
    assert "skipped" in report.summary() and "proj" in report.summary()
    ConvBN().load_state_dict(model.state_dict(), strict=True)


def test_keep_state_dict_keys_false_denoises_them_and_the_fuse_summary_names_the_new_biases():
    model = ConvBN()
    x = torch.randn(2, 3, 8, 8)
    dr.convert(model, DenoiseConfig(init="random", keep_state_dict_keys=False), example_inputs=x)
    _, report = dr.fuse(model, example_inputs=x, return_report=True)
    assert report.added_biases == ["proj"] and report.skipped == []
    assert "1 gained a bias (proj" in report.summary()


def test_a_layer_that_never_runs_gets_no_denoiser():
    class Unused(RegisteredBackwards):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(4, 4)

    model = Unused()
    with pytest.warns(UserWarning, match="never ran.*spare"):
        dr.convert(model, example_inputs=torch.randn(1, 4))
    assert "spare" not in timesteps(model)


def test_a_layer_that_runs_twice_is_reported():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.shared(x))

    with pytest.warns(UserWarning, match=r"shared \(2x\)"):
        dr.convert(Twice(), example_inputs=torch.randn(1, 4))


def test_fusion_is_deterministic_bit_for_bit():
    x = torch.randn(2, 3, 8, 8)
    model = ConvBN()
    dr.convert(model, DenoiseConfig(init="random", sample_noise=True, schedule="ddpm", timestep_range=(10, 900)), example_inputs=x)
    twin = copy.deepcopy(model)
    a, b = dr.fuse(model).state_dict(), dr.fuse(twin).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_noise_is_reproducible_from_the_seed_and_changes_the_output():
    def fused(seed, sample):
        torch.manual_seed(0)
        model = RegisteredBackwards()
        cfg = DenoiseConfig(sample_noise=sample, noise_seed=seed, schedule="ddpm", timestep_range=(500, 900))
        dr.convert(model, cfg, example_inputs=torch.randn(1, 4))
        return dr.fuse(model).state_dict()

    assert torch.equal(fused(3, True)["early.bias"], fused(3, True)["early.bias"])
    assert not torch.equal(fused(3, True)["early.bias"], fused(4, True)["early.bias"])
    assert not torch.equal(fused(3, True)["early.bias"], fused(3, False)["early.bias"])


def test_no_matching_layer_lists_what_exists():
    with pytest.raises(ValueError, match=r"no layer matched.*early \(Linear\).*target_modules"):
        dr.convert(RegisteredBackwards(), DenoiseConfig(target_modules=["nope"]), example_inputs=torch.randn(1, 4))


def test_converting_twice_is_refused():
    model = RegisteredBackwards()
    dr.convert(model, example_inputs=torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="already has DenoiseRep denoisers"):
        dr.convert(model, example_inputs=torch.randn(1, 4))


def test_unsupported_layer_type_is_refused():
    with pytest.raises(ValueError, match="ConvTranspose2d.*not supported"):
        DenoiseConfig(layer_types=(nn.ConvTranspose2d,))
    with pytest.raises(ValueError, match="not supported"):
        DenoiseConfig(layer_types=("Embedding",))


def test_example_inputs_that_fail_to_run_are_explained():
    with pytest.raises(ValueError, match="example_inputs failed to run the model.*torch.randn"):
        dr.convert(RegisteredBackwards(), example_inputs=torch.randn(1, 5))


def test_fusing_a_model_without_denoisers_is_refused():
    with pytest.raises(ValueError, match="nothing to fuse.*convert"):
        dr.fuse(RegisteredBackwards())


def test_layers_with_a_weight_transforming_forward_are_skipped_with_a_warning():
    pytest.importorskip("timm")
    from timm.layers import StdConv2d

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.std = StdConv2d(3, 4, 3)
            self.plain = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.plain(self.std(x))

    model = Model()
    with pytest.warns(UserWarning, match="std \\(StdConv2d\\)"):
        dr.convert(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert set(timesteps(model)) == {"plain"}


def test_bad_config_values_name_the_fix():
    with pytest.raises(ValueError, match="timestep_range"):
        DenoiseConfig(timestep_range=(0, 10))
    with pytest.raises(ValueError, match="choose 'l1', 'l2' or 'l1\\+l2'|choose one of l1, l2, l1\\+l2"):
        DenoiseConfig(loss="huber")
    with pytest.raises(ValueError, match="num_timesteps or set timestep_range"):
        DenoiseConfig(num_timesteps=2).timesteps_for(3)


def test_config_round_trips_through_a_plain_dict():
    cfg = DenoiseConfig(layer_types=("Linear",), target_modules=["a"], timestep_range=(1, 9), denoiser="low_rank")
    assert DenoiseConfig.from_dict(cfg.to_dict()) == cfg
