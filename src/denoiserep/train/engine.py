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
    # Steps between reads of the losses on the host (each read waits for the device): finiteness is
    # checked, and the progress bar updated, this often and at the end of the epoch.
    check_every: int = 50
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

    The losses stay on the device: a step never waits for it. Every ``settings.check_every`` steps
    and at the end the sums are read, and a non-finite loss stops the epoch (the stage's last
    checkpoint, from the epoch before, is kept).
    """
    model.train()  # BatchNorms of a backbone frozen by `set_trainable` keep their statistics (eval mode)
    lam, device = settings.lam, settings.device
    extra_batches = itertools.cycle(extra_loader) if extra_loader is not None else None
    sums: dict[str, torch.Tensor] = {}
    steps = samples = checked = 0
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
        for key, value in (("loss", loss), ("task_loss", task_loss), ("denoise_loss", denoise), *parts.items()):
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            sums[key] = value.clone() if key not in sums else sums[key].add_(value.to(sums[key].device))
        if steps - checked == settings.check_every:
            values = _checked_sums(sums, settings, epoch, checked, steps)
            bar.set_postfix(loss=f"{values['loss'] / steps:.4f}")
            checked = steps
    if steps > checked:
        values = _checked_sums(sums, settings, epoch, checked, steps)
    elapsed = time.perf_counter() - start
    means = {k: v / steps for k, v in values.items()} if steps else {}
    means.setdefault("loss", 0.0)
    means.setdefault("task_loss", 0.0)
    means.setdefault("denoise_loss", 0.0)
    means["samples_per_s"] = samples / elapsed if elapsed > 0 else 0.0
    means["lr"] = optimizer.param_groups[0]["lr"]
    return means, num_updates


def _checked_sums(sums: dict[str, torch.Tensor], settings: EpochSettings, epoch: int, first: int,
                  last: int) -> dict[str, float]:
    """The summed losses read on the host (one read each); NaN or inf anywhere since the epoch began
    stops it."""
    values = {key: float(value) for key, value in sums.items()}
    if all(math.isfinite(v) for v in values.values()):
        return values
    where = f"step {last}" if last - first == 1 else f"steps {first + 1}–{last}"
    raise NonFiniteLossError(
        f"the loss became non-finite in stage '{settings.stage}' at epoch {epoch + 1}, {where} (summed over the "
        f"epoch: loss {values['loss']:.4g}, task {values['task_loss']:.4g}, denoise {values['denoise_loss']:.4g})"
    )
