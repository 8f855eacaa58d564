"""The training loop: a step never waits for the device; a non-finite loss still stops the epoch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import denoiserep as dr
from denoiserep.bench.dispatch import OperatorCount
from denoiserep.train.engine import EpochSettings, NonFiniteLossError, train_one_epoch


class RegressionTask:
    """The part of the Task interface the loop uses; ``nan_at`` makes that step's loss NaN."""

    def __init__(self, nan_at: int | None = None):
        self.nan_at, self.steps = nan_at, 0

    def training_loss(self, model, batch):
        inputs, targets = batch
        self.steps += 1
        loss = F.mse_loss(model(inputs), targets)
        if self.steps == self.nan_at:
            loss = loss * float("nan")
        return loss, {}

    def noise_forward(self, model, inputs):
        return model(inputs)


def setup(steps: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    dr.convert(model, dr.DenoiseConfig(keep_state_dict_keys=False, exclude_classifier=False),
               example_inputs=torch.randn(2, 4))
    dr.set_trainable(model)
    loader = [(torch.randn(4, 4), torch.randn(4, 2)) for _ in range(steps)]
    optimizer = torch.optim.SGD(dr.denoiser_parameters(model), lr=0.01)
    return model, loader, optimizer


@pytest.mark.parametrize("lam", [0.5, 1.0], ids=["label-aug", "label-free"])
def test_the_losses_are_read_back_only_at_the_checks(lam):
    model, loader, optimizer = setup(steps=6)
    settings = EpochSettings(lam=lam, device=torch.device("cpu"), show_progress=False, check_every=4)
    with OperatorCount() as count:
        means, updates = train_one_epoch(model, loader, optimizer, RegressionTask(), settings, epoch=0, num_updates=0)
    # Two checks (after step 4 and at the end), each reading the three summed losses once.
    assert count.operators["_local_scalar_dense"] == 2 * 3
    assert updates == 6 and means["loss"] > 0 and means["denoise_loss"] > 0


@pytest.mark.parametrize("nan_at, where", [(2, "steps 1–4"), (6, "steps 5–6")])
def test_a_non_finite_loss_stops_the_epoch_and_names_the_steps(nan_at, where):
    model, loader, optimizer = setup(steps=6)
    settings = EpochSettings(lam=0.5, device=torch.device("cpu"), show_progress=False, check_every=4)
    with pytest.raises(NonFiniteLossError, match=f"non-finite .* at epoch 1, {where}"):
        train_one_epoch(model, loader, optimizer, RegressionTask(nan_at=nan_at), settings, epoch=0, num_updates=0)
