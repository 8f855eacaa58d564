"""Training behaviour: what trains, what the noise loss does, precision and parallel modes."""

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import denoiserep as dr
from denoiserep import DenoiseConfig, DenoiseHead
from conftest import free_port, gloo_group


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def structured_batch(n=32):
    """Inputs with strong channel structure, so a linear denoiser can learn to predict noise."""
    base = torch.randn(n, 1, 1, 1) * torch.ones(1, 1, 6, 6)
    return base + 0.05 * torch.randn(n, 1, 6, 6)


def test_noise_loss_only_gives_the_same_loss_and_gradients_without_a_graph_through_the_backbone():
    model = small_cnn()
    x = structured_batch(8)
    dr.convert(model, DenoiseConfig(init="random", loss_token_fraction=0.5), example_inputs=x)
    dr.set_trainable(model)
    model.train()

    def loss_and_grads(context):
        torch.manual_seed(0)  # the same noise samples and token subsets in both runs
        with context:
            outputs = model(x)
        loss = dr.denoise_loss(model)
        grads = torch.autograd.grad(loss, list(dr.denoiser_parameters(model)), allow_unused=True)
        return outputs, loss, grads

    outputs, loss, grads = loss_and_grads(contextlib.nullcontext())
    outputs_only, loss_only, grads_only = loss_and_grads(dr.noise_loss_only(model))
    assert outputs.requires_grad and not outputs_only.requires_grad
    torch.testing.assert_close(outputs_only, outputs.detach())
    torch.testing.assert_close(loss_only, loss)
    for g, g_only in zip(grads, grads_only):
        assert (g is None) == (g_only is None)
        if g is not None:
            torch.testing.assert_close(g_only, g)
    assert not any(d.noise_loss_only for _, _, d in dr.layer_denoisers(model))  # the context restores


def test_training_the_denoisers_lowers_the_noise_loss_and_leaves_the_backbone_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 2) @ torch.randn(2, 16)  # rank-2 features: noise off that plane is predictable
    dr.convert(model, DenoiseConfig(loss="l2", schedule="ddpm", timestep_range=(100, 400)), example_inputs=x)
    counts = dr.set_trainable(model)
    assert counts["backbone"] == 0 and counts["denoisers"] > 0
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam(dr.denoiser_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(150):
        model(x)
        loss = dr.denoise_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if n in backbone)


def test_task_loss_reaches_the_denoisers_through_the_fused_weights():
    model = small_cnn()
    x = structured_batch(8)
    dr.convert(model, example_inputs=x)
    dr.set_trainable(model)
    model.train()
    out = model(x)
    dr.denoise_loss(model)  # discard: only the task path's gradient is checked here
    out.square().mean().backward()
    grads = [p.grad for p in dr.denoiser_parameters(model)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_denoise_loss_refuses_to_return_a_loss_no_training_forward_produced_and_resets_after_each_call():
    model = small_cnn()
    x = structured_batch(4)
    assert dr.denoise_loss(model).item() == 0.0  # not converted: no noise loss exists
    dr.convert(model, example_inputs=x)
    with pytest.raises(RuntimeError, match="no forward in train mode with gradients"):
        dr.denoise_loss(model)  # before any forward
    model.eval()
    model(x)
    with pytest.raises(RuntimeError, match="model.train"):
        dr.denoise_loss(model)  # eval mode accumulates nothing
    model.train()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no_grad"):
        dr.denoise_loss(model)
    model(x)
    assert dr.denoise_loss(model).item() > 0
    with pytest.raises(RuntimeError):
        dr.denoise_loss(model)  # collected: the next call needs a new forward
    dr.set_trainable(model, denoisers=False, backbone=True)
    assert dr.denoise_loss(model).item() == 0.0  # frozen denoisers (the alternating schedule's backbone phase)


def test_alternating_phase_trains_the_backbone_through_the_fused_weights_only():
    model = small_cnn()
    x = structured_batch(4)
    dr.convert(model, example_inputs=x)
    counts = dr.set_trainable(model, denoisers=False, backbone=True)
    assert counts["denoisers"] == 0 and counts["backbone"] > 0
    model.train()
    model(x).sum().backward()
    assert dr.denoise_loss(model).item() == 0.0  # frozen denoisers accumulate no noise loss
    assert all(p.grad is None for p in dr.denoiser_parameters(model))


@pytest.mark.parametrize("form", ["full", "low_rank"])
def test_bf16_autocast_forward_and_backward(form):
    model = small_cnn()
    x = structured_batch(4)
    dr.convert(model, DenoiseConfig(denoiser=form), example_inputs=x)
    dr.set_trainable(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().square().mean() + dr.denoise_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in dr.denoiser_parameters(model) if p.grad is not None)


def test_token_subsampling_estimates_the_same_loss():
    model = small_cnn()
    x = structured_batch(64)
    full, sub = copy.deepcopy(model), copy.deepcopy(model)
    dr.convert(full, DenoiseConfig(init="random"), example_inputs=x)
    dr.convert(sub, DenoiseConfig(init="random", loss_token_fraction=0.25), example_inputs=x)
    full.train(), sub.train()
    torch.manual_seed(0)
    a = sum(dr.denoise_loss(full).item() for _ in range(20) if full(x) is not None) / 20
    b = sum(dr.denoise_loss(sub).item() for _ in range(20) if sub(x) is not None) / 20
    assert b == pytest.approx(a, rel=0.05)


def test_a_deep_copy_keeps_working_after_the_original_is_fused():
    model = small_cnn()
    x = structured_batch(4)
    dr.convert(model, DenoiseConfig(init="random"), example_inputs=x)
    ema = copy.deepcopy(model).eval()
    with torch.no_grad():
        before = ema(x)
        dr.fuse(model)
        torch.testing.assert_close(ema(x), before)
        torch.testing.assert_close(model.eval()(x), before, rtol=1e-5, atol=1e-5)


def test_denoise_head_learns_to_predict_noise_and_samples_deterministically():
    torch.manual_seed(0)
    head = DenoiseHead(dim=6, steps=10, hidden_dim=64, schedule="ddpm", num_timesteps=10)
    features = torch.randn(256, 1) * torch.tensor([[1.0, -1.0, 0.5, 2.0, 0.0, 1.5]])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    losses = []
    for _ in range(200):
        head(features)
        loss = dr.denoise_loss(head)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.6 * sum(losses[:20])
    head.eval()
    with torch.no_grad():
        assert torch.equal(head(features), head(features))
        assert head(features).shape == features.shape


def test_denoise_head_with_sampled_noise_is_seeded():
    head = DenoiseHead(dim=4, steps=3, schedule="ddpm", num_timesteps=10, sample_noise=True, noise_seed=7).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(head(x), head(x))


def _ddp_worker(rank, world_size, port, result_file):
    with gloo_group(rank, world_size, port):
        torch.manual_seed(0)
        model = small_cnn()
        x = structured_batch(8)
        dr.convert(model, example_inputs=x)
        dr.set_trainable(model)
        ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False on purpose
        optimizer = torch.optim.SGD(dr.denoiser_parameters(ddp), lr=0.1)
        ddp.train()
        for step in range(3):
            shard = x[rank::world_size]
            loss = 0.5 * ddp(shard).square().mean() + 0.5 * dr.denoise_loss(ddp)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        params = torch.cat([p.detach().flatten() for p in dr.denoiser_parameters(ddp)])
        gathered = [torch.zeros_like(params) for _ in range(world_size)]
        dist.all_gather(gathered, params)
        if rank == 0:
            torch.save(gathered, result_file)


def test_ddp_trains_denoisers_without_unused_parameter_errors_and_keeps_replicas_in_sync(tmp_path):
    port = free_port()
    result = tmp_path / "params.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(result)), nprocs=2, join=True)
    replica0, replica1 = torch.load(result)
    assert torch.equal(replica0, replica1)


def test_uncollected_noise_losses_are_bounded_and_the_user_is_told():
    from denoiserep.layers import MAX_PENDING_LOSSES

    model = small_cnn()
    x = structured_batch(2)
    dr.convert(model, example_inputs=x)
    model.train()
    with pytest.warns(UserWarning, match="without denoiserep.denoise_loss"):
        for _ in range(MAX_PENDING_LOSSES + 1):
            model(x)
    assert all(len(d._pending_losses) == MAX_PENDING_LOSSES for _, _, d in dr.layer_denoisers(model))


@pytest.mark.parametrize("sample_noise", [False, True])
def test_the_denoise_heads_sampler_takes_the_reverse_steps_of_its_definition(sample_noise):
    torch.manual_seed(0)
    head = DenoiseHead(dim=5, steps=7, hidden_dim=16, schedule="ddpm", num_timesteps=50, sample_noise=sample_noise,
                       noise_seed=3).eval()
    features = torch.randn(4, 5)
    x = features
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in range(7, 0, -1):  # F_{t−1} = c3 F_t − c1 D(F_t, t) + σ_t z, step by step
            predicted = head.predict_noise(x, torch.full((4,), t))
            x = head.c3[t - 1] * x - head.c1[t - 1] * predicted
            if sample_noise and t > 1:
                x = x + head.sigma[t - 1] * torch.randn(x.shape, generator=generator)
        torch.testing.assert_close(head(features), x, rtol=1e-5, atol=1e-6)
