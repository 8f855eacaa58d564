"""The pipeline's stages: baseline, control, denoise (DenoiseRep), head (DenoiseRep⁻).

Each stage lives in its own folder under the run directory::

    <run>/<variant>/checkpoint.pt    last completed epoch (atomic; what --resume continues from)
    <run>/<variant>/log.csv          one row per epoch
    <run>/<variant>/model.safetensors  final plain weights (fused, for DenoiseRep)
    <run>/<variant>/result.json      written last: its presence marks the stage as finished
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from ..calibrate import FEW_ROWS_PER_CHANNEL, calibrate, noise_loss_report
from ..checkpoint import atomic_write, load_fused, load_state_dict_checked, read_state_dict, save_fused
from ..convert import conversion_state, convert, denoiser_parameters, set_trainable, unwrap
from ..fuse import fuse
from ..task_heads import task_heads
from .config import TrainConfig
from .distributed import DistInfo, average_batchnorm_statistics, barrier
from .engine import EpochSettings, NonFiniteLossError, train_one_epoch
from .outputs import StageResult, denoise_head, load_stage_weights, read_checkpoint, read_result

logger = logging.getLogger(__name__)

# timm optimizer names that are torch's Adam / AdamW / SGD, which have a fused CUDA implementation.
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov")

NOISE_LOSS_BATCHES = 4  # validation batches every noise-loss report of a denoise stage is measured on


@dataclass
class StageSpec:
    """What to run: ``stage`` is the recipe, ``variant`` the folder/row name (e.g. denoise-label-free).

    ``lam`` / ``noise_weight``: the loss, (1 − λ)·task + λ·noise, or task + w·noise (the authors'
    code) when ``noise_weight`` is given. ``epochs`` and ``denoise_init`` override the run's
    ``extra_epochs`` / ``denoise_init`` for this variant (e.g. the demo's calibrated-only row:
    ``epochs=0, denoise_init="calibrate"``); ``denoise`` overrides fields of the run's ``denoise``
    settings (e.g. ``{"timestep_mapping": "authors-code"}``).
    """

    stage: str
    variant: str
    lam: float = 0.0
    epochs: int | None = None
    denoise_init: str | None = None
    noise_weight: float | None = None
    denoise: dict | None = None

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """The run's config with this variant's ``denoise`` overrides."""
        return dataclasses.replace(cfg, denoise={**cfg.denoise, **self.denoise}) if self.denoise else cfg


def run_stage(spec: StageSpec, cfg: TrainConfig, task, info: DistInfo, device: torch.device,
              *, resume: bool = False) -> StageResult:
    """Run one stage in ``<run>/<variant>`` (`denoiserep.train.rundir.check_run` has checked that
    this may write there); with ``resume`` a finished stage is reused and an unfinished one continued."""
    cfg = spec.config(cfg)
    stage_dir = cfg.run_dir / spec.variant
    result_path = stage_dir / "result.json"
    if resume and result_path.exists():
        result = read_result(result_path)
        if result.weights and not (cfg.run_dir / result.weights).exists():
            # Written before weights were stored relative to the run: the path as seen from that
            # working directory. The stage's file is where it always was.
            result.weights = f"{spec.variant}/model.safetensors"
        result.model = _StageRunner(spec, cfg, task, info, device, stage_dir).load_final(result)
        return result
    seed_everything(cfg.seed)
    runner = _StageRunner(spec, cfg, task, info, device, stage_dir)
    return runner.run(resume)


def check_stage_settings(specs: list[StageSpec], cfg: TrainConfig, task, device: torch.device) -> None:
    """Raise now, before the first stage trains, for settings that only a model can check: a denoise
    stage's conversion (``--target-modules`` that match nothing, fewer timesteps than layers, …) on a
    freshly built model, and a head stage's head."""
    stages = {spec.stage for spec in specs}
    if "matched-control" in stages and cfg.alternate_every is None:
        raise ValueError("the matched-control stage trains the backbone in exactly the epochs where an alternating "
                         "recipe does (--alternate-every K); set --alternate-every, or use --recipe paper")
    if cfg.test_fraction > 0 and not getattr(task, "supports_test_split", False):
        raise ValueError(f"--test-fraction {cfg.test_fraction}: the {task.name} task cannot hold out a test split "
                         "(its class does not set supports_test_split); leave --test-fraction at 0")
    if not stages & {"denoise", "head"}:
        return
    with preserved_rng_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stage itself warns about what its conversion leaves out
        if "head" in stages:
            denoise_head(task, cfg, task.build_model().to(device))
        denoise_configs = [spec.config(cfg) for spec in specs if spec.stage == "denoise"]
        configs = {json.dumps(spec_cfg.denoise, sort_keys=True, default=str): spec_cfg for spec_cfg in denoise_configs}
        for spec_cfg in configs.values():  # each distinct conversion once
            model = task.build_model().to(device)
            root = task.conversion_root(model)
            try:
                convert(root, spec_cfg.denoise_config(root), example_inputs=task.conversion_inputs(model, device))
            except (ValueError, RuntimeError) as error:
                raise ValueError(f"the denoise stage's settings (denoise: {spec_cfg.denoise}) do not apply to this "
                                 f"model: {error}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng_state():
    """Run a block without advancing Python's, NumPy's or torch's (CPU and CUDA) random state."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class _StageRunner:
    def __init__(self, spec: StageSpec, cfg: TrainConfig, task, info: DistInfo, device: torch.device, stage_dir: Path):
        self.spec, self.cfg, self.task, self.info, self.device = spec, cfg, task, info, device
        self.stage_dir = stage_dir
        self.checkpoint_path = stage_dir / "checkpoint.pt"
        self.autocast_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        self.is_baseline = spec.stage == "baseline"
        self.epochs = cfg.epochs if self.is_baseline else cfg.extra_epochs
        if spec.epochs is not None:
            self.epochs = spec.epochs
        self.denoise_init = spec.denoise_init or cfg.denoise_init
        # Noise loss of the denoisers (see `_initialise_denoisers`), kept in the checkpoint for --resume.
        self.noise_loss: dict = {}
        self.lr = cfg.lr if self.is_baseline else cfg.extra_lr  # control: same budget as DenoiseRep
        # Alternating phases (--alternate-every): a denoise stage whose loss has a task term, and the
        # matched control that mirrors it; a label-free stage has no task loss to train the backbone on.
        uses_labels = spec.noise_weight is not None or spec.lam < 1.0
        self.alternates = cfg.alternate_every is not None and (
            spec.stage == "matched-control" or (spec.stage == "denoise" and uses_labels))
        # The selected epoch (select "best"): {"epoch", "metric", "model": state}; kept in the checkpoint.
        self.best: dict | None = None
        self._tensorboard = None  # SummaryWriter, or False when tensorboard is not installed

    # -- model per stage -------------------------------------------------------------------
    def build(self) -> nn.Module:
        model = self.task.build_model()
        if self.is_baseline:
            if self.cfg.init:
                load_init_weights(model, self.cfg.init, reset_classifier=self.cfg.reset_classifier)
        else:
            load_fused(model, self.cfg.run_dir / "baseline" / "model.safetensors")
        model.to(self.device)
        stage = self.spec.stage
        if stage == "denoise":
            root = self.task.conversion_root(model)
            _, conversion = convert(root, self.cfg.denoise_config(root),
                                    example_inputs=self.task.conversion_inputs(model, self.device), return_report=True)
            if self.info.is_main:
                tqdm.write(f"{self.spec.variant}: {conversion.summary()}", file=sys.stderr)
            # With the alternating option both roles train (in turns): the optimizer holds every
            # parameter (`_optimizer`) and `_set_phase` toggles requires_grad per epoch.
            set_trainable(model, denoisers=True, backbone=self.alternates)
            if self.cfg.alternate_every is not None and not self.alternates and self.info.is_main:
                tqdm.write(f"{self.spec.variant}: label-free, so no backbone phases (they train on the task loss); "
                           "the denoisers train in every epoch", file=sys.stderr)
        elif stage == "head":
            model = self.task.wrap_with_head(model, denoise_head(self.task, self.cfg, model)).to(self.device)
            set_trainable(model, denoisers=True, backbone=False)
        return model

    def load_final(self, result: StageResult) -> nn.Module:
        """The finished stage's model, rebuilt from its saved (fused) weights."""
        return load_stage_weights(self.task, self.cfg, self.cfg.run_dir / result.weights, self.device,
                                  expected_stage=self.spec.stage)

    def phase(self, epoch: int) -> str:
        """What trains in ``epoch`` (0-based): "all" (baseline, control), "denoisers" (backbone frozen:
        the paper), or, alternating every K epochs (denoisers first, as the authors' code),
        "backbone" (on the task loss through W′, denoisers frozen); the matched control trains its
        backbone in those same epochs and is "idle" in the others (its schedule still advances)."""
        if self.spec.stage in ("baseline", "control"):
            return "all"
        if not self.alternates:
            return "denoisers"
        backbone = (epoch // self.cfg.alternate_every) % 2 == 1
        if self.spec.stage == "matched-control":
            return "backbone" if backbone else "idle"
        return "backbone" if backbone else "denoisers"

    def _set_phase(self, model: nn.Module, epoch: int) -> str:
        phase = self.phase(epoch)
        if self.alternates and self.spec.stage == "denoise":
            set_trainable(model, denoisers=phase == "denoisers", backbone=phase == "backbone")
        return phase

    def _epoch_settings(self, settings: EpochSettings, phase: str) -> EpochSettings:
        """The loss of one phase: a backbone phase trains on the task loss (the frozen denoisers add no
        gradient); with ``noise_weight`` (the authors' form) the task loss never reaches the denoisers,
        so a denoiser phase trains on w·noise alone (a label-free step)."""
        if phase == "backbone":
            return dataclasses.replace(settings, lam=0.0)
        if phase == "denoisers" and settings.noise_weight is not None:
            return dataclasses.replace(settings, lam=1.0)
        return settings

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The baseline's and controls' optimizer (weight decay on the weights, timm's groups); the
        denoisers train without. Alternating, the backbone's groups are exactly the control's, and the
        denoisers join as one more group."""
        cfg = self.cfg
        # torch's fused Adam / AdamW / SGD on a GPU: one kernel per update, and no read of the step
        # counters on the host (what CUDA-graph capture needs), for every stage alike.
        fused = {"fused": True} if self.device.type == "cuda" and cfg.opt.lower() in FUSED_OPTIMIZERS else {}
        if self.spec.stage in ("baseline", "control", "matched-control"):
            return create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, **fused)
        if not self.alternates:
            return create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=0.0, **fused)
        set_trainable(model, denoisers=False, backbone=True)
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, **fused)
        optimizer.add_param_group({"params": list(denoiser_parameters(model)), "weight_decay": 0.0})
        set_trainable(model, denoisers=True, backbone=True)
        return optimizer

    def _idle_epoch(self, model: nn.Module, optimizer, epoch: int, num_updates: int, scheduler,
                    ema) -> tuple[dict, int]:
        """An epoch in which nothing trains (the matched control while the recipe trains its
        denoisers): the schedule and the EMA advance by the recipe's steps, so that every later step
        has the recipe's learning rate."""
        steps = len(self.task.train_loader(self.info, self.cfg.seed, epoch))
        for _ in range(steps):
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
        nan = float("nan")
        return {"loss": nan, "task_loss": nan, "denoise_loss": nan, "samples_per_s": 0.0,
                "lr": optimizer.param_groups[0]["lr"]}, num_updates

    # -- the loop -----------------------------------------------------------------------------
    def run(self, resume: bool) -> StageResult:
        cfg, info = self.cfg, self.info
        model = self.build()
        resuming = resume and self.checkpoint_path.exists()
        if self.spec.stage == "denoise" and not resuming:
            self._initialise_denoisers(model)  # before the EMA copy and the optimizer see the parameters
        optimizer = self._optimizer(model)
        steps_per_epoch = len(self.task.train_loader(info, cfg.seed, 0, for_denoisers=self.spec.stage == "denoise"))
        scheduler = None
        if self.epochs > 0:
            warmup = cfg.warmup_epochs if self.is_baseline else cfg.extra_warmup_epochs
            scheduler, _ = create_scheduler_v2(
                optimizer, sched=cfg.sched, num_epochs=self.epochs, warmup_epochs=warmup,
                decay_rate=cfg.sched_decay_rate, updates_per_epoch=steps_per_epoch,
                warmup_lr=self.lr * 0.01 if warmup else None,
            )
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
        start_epoch, num_updates, history = 0, 0, []
        if resuming:
            start_epoch, num_updates, history = self._load_checkpoint(model, optimizer, scheduler, ema)
            logger.info("%s: resuming after epoch %d", self.spec.variant, start_epoch - 1)
        train_model = self._wrap_ddp(model)
        if cfg.compile:
            # CUDA graphs ("reduce-overhead") replay the whole step's kernels at once on a GPU.
            train_model = torch.compile(train_model, mode="reduce-overhead" if self.device.type == "cuda" else None)
        settings = EpochSettings(
            lam=self.spec.lam, device=self.device, autocast_dtype=self.autocast_dtype, grad_clip=cfg.grad_clip,
            stage=self.spec.variant, show_progress=info.is_main, noise_weight=self.spec.noise_weight,
        )
        for epoch in range(start_epoch, self.epochs):
            if self._patience_exhausted(epoch):
                if info.is_main:
                    tqdm.write(f"{self.spec.variant}: stopped after epoch {epoch}: validation "
                               f"{self.task.primary_metric} has not improved for {cfg.baseline_patience} epochs "
                               f"(best: epoch {self.best['epoch']})", file=sys.stderr)
                break
            phase = self._set_phase(model, epoch)
            if phase == "idle":
                train_stats, num_updates = self._idle_epoch(model, optimizer, epoch, num_updates, scheduler, ema)
                backbone_steps = 0
            else:
                epoch_settings = self._epoch_settings(settings, phase)
                loader = self.task.train_loader(info, cfg.seed, epoch,
                                                for_denoisers=self.spec.stage == "denoise" and phase == "denoisers")
                trains_noise = epoch_settings.lam > 0 or epoch_settings.noise_weight is not None
                extra = self.task.extra_loader(info, cfg.seed, epoch) if phase != "backbone" and trains_noise \
                    else None
                backbone_steps = len(loader) if phase in ("all", "backbone") else 0
                try:
                    train_stats, num_updates = train_one_epoch(
                        train_model, loader, optimizer, self.task, epoch_settings, epoch=epoch,
                        num_updates=num_updates, scheduler=scheduler, ema=ema, extra_loader=extra,
                    )
                except NonFiniteLossError as error:
                    kept = self.checkpoint_path if self.checkpoint_path.exists() else "none (no epoch finished)"
                    raise NonFiniteLossError(
                        f"{error}. Stopped; the last good checkpoint is {kept}. Lower --lr / --extra-lr or set "
                        "--grad-clip, then rerun with --resume."
                    ) from None
            if scheduler is not None:
                scheduler.step(epoch + 1)
            # The ranks' BatchNorm statistics differ where they train: the saved model is their mean
            # (statistics `set_trainable` holds are equal on every rank, and their mean is exact).
            average_batchnorm_statistics(model)
            if ema is not None:
                average_batchnorm_statistics(ema.module)
            eval_model = ema.module if ema is not None else model
            metrics = self.task.evaluate(eval_model, info, self.device, self.autocast_dtype)
            self._select(eval_model, epoch, metrics)
            # Epochs count from 1 everywhere a person reads them: the progress bar, this log, log.csv, plots.
            row = {"epoch": epoch + 1, "phase": phase, "backbone_steps": backbone_steps, **train_stats,
                   **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(row)
            if info.is_main:
                value = f"val {self.task.primary_metric} {metrics[self.task.primary_metric]:.2f}"
                if phase == "idle":
                    line = f"idle (the recipe trains its denoisers), {value}"
                else:
                    line = (f"loss {train_stats['loss']:.4f} (task {train_stats['task_loss']:.4f}, denoise "
                            f"{train_stats['denoise_loss']:.4f}), {value}, {train_stats['samples_per_s']:.0f} samples/s")
                tqdm.write(f"{self.spec.variant} epoch {epoch + 1}/{self.epochs}"
                           f"{f' [{phase}]' if self.alternates else ''}: {line}", file=sys.stderr)
                self._save_checkpoint(model, optimizer, scheduler, ema, epoch, num_updates, history)
                self._append_log(row)
                self._log_tensorboard(row)
            barrier()
        final = ema.module if ema is not None else model
        return self._finish(final, history)

    # -- which epoch the stage keeps --------------------------------------------------------------
    def _select(self, model: nn.Module, epoch: int, metrics: dict) -> None:
        """With select "best", keep the weights of the best validation metric so far (NaN never wins)."""
        if self.cfg.select != "best":
            return
        value = float(metrics[self.task.primary_metric])
        value = value if math.isfinite(value) else -math.inf
        if self.best is None or value > self.best["metric"]:
            self.best = {"epoch": epoch + 1, "metric": value,
                         "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

    def _patience_exhausted(self, epoch: int) -> bool:
        """The baseline's early stop: ``baseline_patience`` epochs after its best one without a better one."""
        patience = self.cfg.baseline_patience
        return bool(self.is_baseline and patience and self.best and epoch - self.best["epoch"] >= patience)

    # -- the denoisers' own objective ----------------------------------------------------------
    @functools.cached_property
    def _diagnostic_batches(self) -> list[tuple]:  # read under `preserved_rng_state` (see `_noise_loss`)
        """Fixed validation inputs on which every noise-loss report of the stage is measured
        (nothing is tuned on them: they only show the objective and its optimum, label-free)."""
        return [(inputs,) for inputs in self.task.validation_inputs(NOISE_LOSS_BATCHES)]

    def _noise_loss(self, model: nn.Module) -> dict:
        with preserved_rng_state():  # a diagnostic: it must not change what training samples
            return noise_loss_report(model, self._diagnostic_batches).to_dict()

    def _initialise_denoisers(self, model: nn.Module) -> None:
        """Measure the identity-initialised denoisers; with ``denoise_init="calibrate"`` set them to
        the closed-form optimum of their noise loss on up to ``calibrate_batches`` training batches."""
        self.noise_loss["identity"] = self._noise_loss(model)
        if self.denoise_init == "calibrate":
            loader = self.task.train_loader(self.info, self.cfg.seed, 0, for_denoisers=True)
            # The loader's augmentations draw random numbers: keep training's random stream as it
            # would be without calibration, so calibrated and identity runs see the same batches.
            with preserved_rng_state():
                report = calibrate(model, LoaderInputs(loader), max_batches=self.cfg.calibrate_batches,
                                   passes=self.cfg.calibrate_passes, progress=self.info.is_main)
            self.noise_loss["calibrated"] = self._noise_loss(model)
            self.noise_loss["calibration"] = {
                "batches": report.batches, "passes": report.passes, "seconds": report.seconds,
                # Measured on the training batches calibration held out (in-sample without any).
                "held_out": report.held_out, "measured_batches": report.after.batches,
                "l2_before": report.before.l2, "l2_after": report.after.l2, "l2_optimum": report.after.l2_optimum,
                "fewest_rows_per_channel": min(fit.rows_per_channel for fit in report.fits),
                "layers_kept": [fit.name for fit in report.fits if fit.kept],
            }
        if self.info.is_main:
            tqdm.write(f"{self.spec.variant}: {noise_loss_line(self.noise_loss)}", file=sys.stderr)

    def _finish(self, model: nn.Module, history: list[dict]) -> StageResult:
        info, task = self.info, self.task
        extra: dict = {"select": self.cfg.select, "backbone_steps": sum(row.get("backbone_steps", 0) for row in history)}
        if self.best is not None:
            model.load_state_dict(self.best["model"])
            extra["selected_epoch"] = self.best["epoch"]
        if self.spec.stage == "denoise":
            self.noise_loss["end"] = self._noise_loss(model)
            extra["noise_loss"] = self.noise_loss
            if info.is_main:
                tqdm.write(f"{self.spec.variant}: {noise_loss_line(self.noise_loss)}", file=sys.stderr)
            unfused_metrics = task.evaluate(model, info, self.device, self.autocast_dtype)
            unfused_outputs = task.predictions(model, self.device) if info.is_main else None
            # Fused == unfused is checked where the denoisers live (the conversion root, on its own
            # inputs): a detector's final boxes can differ in number after one rounding flip in NMS,
            # which the task's `compare_outputs` reports as such instead.
            _, report = fuse(task.conversion_root(model), example_inputs=task.conversion_inputs(model, self.device),
                             return_report=True)
            metrics = task.evaluate(model, info, self.device, self.autocast_dtype)
            extra["unfused_metrics"] = unfused_metrics
            extra["fuse_max_relative_error"] = report.max_relative_error
            extra["added_biases"] = report.added_biases
            extra["skipped_layers"] = report.skipped
            if info.is_main:
                extra.update(task.compare_outputs(unfused_outputs, task.predictions(model, self.device)))
        else:
            metrics = task.evaluate(model, info, self.device, self.autocast_dtype)
        if getattr(task, "has_test_split", False):
            # The one read of the test split: the stage's final (selected, fused) weights, after selection.
            extra["test_metrics"] = task.evaluate(model, info, self.device, self.autocast_dtype, split="test")
        result = StageResult(self.spec.variant, self.spec.stage, metrics, history, extra=extra, model=model)
        if info.is_main:
            weights = self.stage_dir / "model.safetensors"
            save_fused(model, weights, metadata={"stage": self.spec.stage, "variant": self.spec.variant},
                       added_biases=extra.get("added_biases"))
            result.weights = str(weights.relative_to(self.cfg.run_dir))  # the run folder can move
            result_text = json.dumps(result.to_dict(), indent=2)
            atomic_write(self.stage_dir / "result.json", lambda tmp: Path(tmp).write_text(result_text))
        barrier()
        return result

    # -- helpers ------------------------------------------------------------------------------
    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.info.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # The alternating option changes which parameters train, which DDP must be told about.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=bool(self.cfg.alternate_every)
        )

    def _append_log(self, row: dict) -> None:
        path = self.stage_dir / "log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _log_tensorboard(self, row: dict) -> None:
        """TensorBoard scalars when the tensorboard package is installed (the CSV log is always written)."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(log_dir=str(self.stage_dir / "tensorboard"))
        if self._tensorboard:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tensorboard.add_scalar(key, value, row["epoch"])
            self._tensorboard.flush()

    def _save_checkpoint(self, model, optimizer, scheduler, ema, epoch, num_updates, history) -> None:
        payload = {
            "epoch": epoch,
            "num_updates": num_updates,
            "history": history,
            "model": model.state_dict(),
            "conversion": self._conversion(model) if self.spec.stage == "denoise" else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "noise_loss": self.noise_loss,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(payload, tmp))

    def _conversion(self, model: nn.Module) -> dict:
        """The conversion plan, stored with the module it was applied to (the task's conversion root)."""
        return conversion_state(self.task.conversion_root(unwrap(model))).to_dict()

    def _load_checkpoint(self, model, optimizer, scheduler, ema) -> tuple[int, int, list[dict]]:
        payload = read_checkpoint(self.checkpoint_path, self.device, denoise=self.spec.stage == "denoise")
        if self.spec.stage == "denoise" and payload.get("conversion") != self._conversion(model):
            raise ValueError(
                f"{self.checkpoint_path} was converted with other DenoiseRep settings than this run's; resume "
                "with the same config, or start a new --name"
            )
        load_state_dict_checked(model, payload["model"], self.checkpoint_path)
        optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if ema is not None and payload["ema"] is not None:
            ema.load_state_dict(payload["ema"])
        self.noise_loss = payload.get("noise_loss") or {}
        self.best = payload.get("best")
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return payload["epoch"] + 1, payload["num_updates"], payload["history"]


def _numpy_state() -> dict:
    """NumPy's global RNG state as tensors and plain numbers (what a weights_only load accepts)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].cpu().numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["cached_gaussian"]))


class LoaderInputs:
    """A loader's inputs as calibration batches ``(inputs,)``, iterable again for every pass."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self):
        return ((inputs,) for inputs, _ in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def noise_loss_line(noise_loss: dict) -> str:
    """One log line: the L1 noise loss at each point so far, and the exact L2 gap to the optimum."""
    points = [(name, noise_loss[name]) for name in ("identity", "calibrated", "end") if name in noise_loss]
    last = points[-1][1]
    journey = " → ".join(f"{name} {report['l1']:.4f}" for name, report in points)
    line = (f"noise loss (L1, sum over {len(last['layers'])} layers, {last['batches']} validation batches): {journey}; "
            f"expected L2 {last['l2']:.4f} vs optimum {last['l2_optimum']:.4f} (gap {last['l2_gap']:.4f})")
    few = [layer["name"] for layer in last["layers"] if layer.get("rows_per_channel", math.inf) < FEW_ROWS_PER_CHANNEL]
    if few:
        line += (f"; {len(few)} layers see fewer than {FEW_ROWS_PER_CHANNEL} validation rows per channel, where the "
                 "optimum of these batches is below what any denoiser reaches on new inputs (the gap looks larger)")
    return line


def load_init_weights(model: nn.Module, path: str, reset_classifier: bool = False) -> None:
    """Load a user's checkpoint (.safetensors, or a torch file holding a state_dict). With
    ``reset_classifier``, a classifier of another class count is not loaded: the model keeps its
    freshly initialised one (the pretrained start of a fine-tuning run)."""
    state = read_state_dict(path)
    own = model.state_dict()
    for head_name in task_heads(unwrap(model)):
        keys = [k for k in own if k.startswith(f"{head_name}.")]
        differs = [k for k in keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if not differs:
            continue
        if not reset_classifier:
            raise ValueError(
                f"--init {path} has a {state[differs[0]].shape[0]}-class classifier ({head_name}) but this model has "
                f"{own[differs[0]].shape[0]} classes ({differs[0]}: {tuple(state[differs[0]].shape)} in the file, "
                f"{tuple(own[differs[0]].shape)} in the model). Pass --reset-classifier to start a new classifier "
                "from the rest of the checkpoint (then train it: --epochs > 0), or use a checkpoint of this data's "
                "classes."
            )
        logger.warning("--init %s: its classifier %s does not fit this data's classes and is not loaded; a new one "
                       "is trained (--reset-classifier)", path, head_name)
        state = {**{k: v for k, v in state.items() if not k.startswith(f"{head_name}.")},
                 **{k: own[k] for k in keys}}
    load_state_dict_checked(model, state, path)
