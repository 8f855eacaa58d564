import math

import pytest
import torch

from denoiserep import make_schedule


def test_default_schedule_is_the_authors_linear_range():
    s = make_schedule()
    assert s.num_timesteps == 1000
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(2e-3)


def test_ddpm_schedule_is_the_standard_range():
    s = make_schedule("ddpm")
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)


def test_cosine_schedule_has_decreasing_alpha_bar_and_valid_betas():
    s = make_schedule("cosine", num_timesteps=100)
    assert bool((s.betas > 0).all() and (s.betas < 1).all())
    assert bool((s.alpha_bars[1:] < s.alpha_bars[:-1]).all())


@pytest.mark.parametrize("name", ["linear", "ddpm", "cosine"])
@pytest.mark.parametrize("t", [1, 2, 37, 1000])
def test_step_coefficients_follow_the_ddpm_posterior_mean(name, t):
    s = make_schedule(name)
    c = s.step(t)
    beta = float(s.betas[t - 1])
    alpha_bar = float(torch.prod(1 - s.betas[:t]))
    assert c.alpha_bar == pytest.approx(alpha_bar, rel=1e-12)
    assert c.c3 == pytest.approx(1 / math.sqrt(1 - beta), rel=1e-12)
    assert c.c1 == pytest.approx(beta / (math.sqrt(1 - beta) * math.sqrt(1 - alpha_bar)), rel=1e-12)
    assert c.sqrt_alpha_bar**2 + c.sqrt_one_minus_alpha_bar**2 == pytest.approx(1.0)


def test_first_step_has_no_posterior_noise():
    assert make_schedule().step(1).sigma == 0.0


def test_bad_schedule_arguments_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="choose one of linear, ddpm, cosine"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match=r"outside \[1, 1000\]"):
        make_schedule().step(0)
    with pytest.raises(ValueError, match="beta"):
        make_schedule("linear", beta_start=0.5, beta_end=1.5)
