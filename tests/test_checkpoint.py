"""Checkpoints: resume a converted model exactly; ship fused weights as safetensors."""

import os

import pytest
import torch
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig
from denoiserep.checkpoint import atomic_write


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


X = torch.randn(2, 3, 6, 6)


def converted():
    model = build()
    dr.convert(model, DenoiseConfig(init="random", schedule="ddpm", timestep_range=(5, 50), sample_noise=True), example_inputs=X)
    return model.eval()


def test_a_converted_checkpoint_restores_the_same_model_without_example_inputs(tmp_path):
    model = converted()
    dr.save_converted(model, tmp_path / "run.pt", extra={"epoch": 3})
    restored = build()
    extra = dr.load_converted(restored, tmp_path / "run.pt")
    assert extra == {"epoch": 3}
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(X), model(X))
    a, b = dr.fuse(model).state_dict(), dr.fuse(restored).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # fusing the same checkpoint twice: bit-identical


def test_fused_weights_round_trip_through_safetensors_into_a_fresh_original(tmp_path):
    model = dr.fuse(converted())
    path = dr.save_fused(model, tmp_path / "fused.safetensors", metadata={"arch": "toy"})
    fresh = dr.load_fused(build(), path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model(X))


def test_tied_weights_are_saved_once_and_restored_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    dr.save_fused(model, tmp_path / "tied.safetensors")
    fresh = dr.load_fused(Tied(), tmp_path / "tied.safetensors")
    assert torch.equal(fresh.b.weight, model.a.weight) and fresh.a.weight is fresh.b.weight


def test_loading_a_checkpoint_from_another_architecture_says_so(tmp_path):
    dr.save_converted(converted(), tmp_path / "run.pt")
    other = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="another architecture"):
        dr.load_converted(other, tmp_path / "run.pt")
    wider = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    with pytest.raises(ValueError, match=r"shape mismatch.*num_classes"):
        dr.load_converted(wider, tmp_path / "run.pt")


def test_fused_weights_do_not_load_into_a_different_model(tmp_path):
    path = dr.save_fused(dr.fuse(converted()), tmp_path / "fused.safetensors")
    with pytest.raises(ValueError, match="does not match this model"):
        dr.load_fused(nn.Sequential(nn.Linear(2, 2)), path)


def test_save_fused_refuses_an_unfused_model_and_load_converted_refuses_safetensors(tmp_path):
    with pytest.raises(ValueError, match="call denoiserep.fuse"):
        dr.save_fused(converted(), tmp_path / "x.safetensors")
    path = dr.save_fused(build(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a denoiserep converted checkpoint"):
        dr.load_converted(build(), path)


def test_an_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("previous")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["ckpt.pt"]
