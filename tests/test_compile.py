"""torch.compile: a compiled training step is the eager one (the same losses and gradients)."""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import denoiserep as dr


def converted(**config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Unflatten(1, (8, 1)),
                          nn.Conv1d(8, 4, 1, bias=False))
    # DDPM at t around 200: √ᾱ, c1 and c3 far from 0 and 1, so a dropped scale would show.
    dr.convert(model, dr.DenoiseConfig(init="random", keep_state_dict_keys=False, schedule="ddpm",
                                       timestep_range=(150, 250), **config), example_inputs=torch.randn(2, 8))
    dr.set_trainable(model)
    return model.train()


def two_steps(model, forward):
    """Losses and the gradients of both steps (an SGD update between them)."""
    optimizer = torch.optim.SGD(dr.denoiser_parameters(model), lr=0.05)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for seed in (2, 3):
        torch.manual_seed(seed)
        loss = forward(x).square().mean() + dr.denoise_loss(model)
        optimizer.zero_grad()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in dr.denoiser_parameters(model)]))
        optimizer.step()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, {"loss": "l2", "loss_estimator": "expected", "training_path": "weight"},
                                    {"loss_estimator": "expected", "training_path": "input"},
                                    {"denoiser": "low_rank", "rank": 2, "loss": "l1+l2"}],
                         ids=["sampled l1 (the paper)", "expected l2", "expected l1, input path", "low rank"])
def test_the_compiled_step_equals_the_eager_step(config):  # the first layer's input has no gradient: that too
    torch._dynamo.reset()
    eager = converted(**config)
    compiled = converted(**config)
    # Inductor draws random numbers by its own generator unless told to use eager's: with it, the
    # sampled noise is the same and the two steps compare exactly.
    with inductor_config.patch(fallback_random=True):
        expected, got = two_steps(eager, eager), two_steps(compiled, torch.compile(compiled))
    assert_same_steps(got, expected)


def assert_same_steps(got, expected):
    for (loss, grads), (loss_c, grads_c) in zip(expected, got):
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
        for grad, grad_c in zip(grads, grads_c):
            torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_models_that_differ_only_in_their_token_fraction_compile_in_one_process():
    # The second model recompiles the same code with another fraction: the noise loss's subset
    # size must stay a constant of the graph (it once became symbolic and broke the backward).
    torch._dynamo.reset()
    for fraction in (1.0, 0.5, 0.25):
        eager, compiled = converted(loss_token_fraction=fraction), converted(loss_token_fraction=fraction)
        with inductor_config.patch(fallback_random=True):
            assert_same_steps(two_steps(compiled, torch.compile(compiled)), two_steps(eager, eager))


@pytest.mark.slow
def test_a_compiled_denoise_head_samples_as_the_eager_one():
    head = dr.DenoiseHead(dim=6, steps=9, hidden_dim=16, schedule="ddpm", num_timesteps=100).eval()
    features = torch.randn(5, 6)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(head.sample)(features), head.sample(features), rtol=1e-5, atol=1e-6)
