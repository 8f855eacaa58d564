"""The training loop of one epoch, written out plainly (as torchvision's reference scripts do)."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..convert import denoise_loss, noise_loss_only, to_device


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/inf; the stage keeps its last good checkpoint."""


@dataclass
class EpochSettings:
    lam: float  # Loss = (1 − λ)·task + λ·denoise; λ = 0 is plain training; λ = 1 computes no task loss
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    grad_clip: float | None = None
    stage: str = "train"
    show_progress: bool = True
    # Loss = task + w·denoise instead (the authors' code); λ still says whether the task loss is computed.
    noise_weight: float | None = None


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    task,
    settings: EpochSettings,
    *,
    epoch: int,
    num_updates: int,
    scheduler=None,
    ema=None,
    extra_loader: Iterable | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns mean losses, throughput and the new update count.

    ``task`` (a `denoiserep.tasks.base.Task`) computes the task loss from a batch
    (`Task.training_loss`) and runs the forwards that only feed the noise losses
    (`Task.noise_forward`). With ``extra_loader`` (unlabeled images), every step also runs the
    model on one extra batch and adds that batch's noise loss to the denoise term: the label-free
    loss on merged datasets. The task loss is skipped entirely when λ = 1 (label-free).
    """
    model.train()  # BatchNorms of a backbone frozen by `set_trainable` keep their statistics (eval mode)
    lam, device = settings.lam, settings.device
    extra_batches = itertools.cycle(extra_loader) if extra_loader is not None else None
    sums: dict[str, float] = {"loss": 0.0, "task_loss": 0.0, "denoise_loss": 0.0}
    steps = samples = 0
    start = time.perf_counter()
    # Step bars only on a terminal (disable=None); logs get one line per epoch from the stage.
    bar = tqdm(loader, desc=f"{settings.stage} epoch {epoch + 1}", leave=False,
               disable=None if settings.show_progress else True)
    for batch in bar:
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=settings.autocast_dtype, enabled=settings.autocast_dtype is not None):
            if lam == 1.0:
                # Label-free: nothing is back-propagated through the backbone; the noise losses
                # and their gradients are unchanged.
                with noise_loss_only(model):
                    task.noise_forward(model, batch[0])
                task_loss, parts = torch.zeros((), device=device), {}
            else:
                task_loss, parts = task.training_loss(model, batch)
            denoise = denoise_loss(model)
            if extra_batches is not None:
                extra_inputs, _ = to_device(next(extra_batches), device)
                with noise_loss_only(model):  # extra data feeds only the noise loss
                    task.noise_forward(model, extra_inputs)
                denoise = denoise + denoise_loss(model)
            if settings.noise_weight is not None:
                loss = task_loss + settings.noise_weight * denoise
            else:
                loss = (1.0 - lam) * task_loss + lam * denoise if lam > 0 else task_loss
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"the loss became {loss.item()} in stage '{settings.stage}' at epoch {epoch}, step {steps} "
                f"(task {task_loss.item():.4g}, denoise {denoise.item():.4g})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], settings.grad_clip
            )
        optimizer.step()
        num_updates += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        if ema is not None:
            ema.update(model, step=num_updates)
        steps += 1
        samples += len(batch[0])
        for key, value in (("loss", loss.item()), ("task_loss", task_loss.item()), ("denoise_loss", denoise.item()),
                           *parts.items()):
            sums[key] = sums.get(key, 0.0) + float(value)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    elapsed = time.perf_counter() - start
    means = {k: v / max(steps, 1) for k, v in sums.items()}
    means["samples_per_s"] = samples / elapsed if elapsed > 0 else 0.0
    means["lr"] = optimizer.param_groups[0]["lr"]
    return means, num_updates

