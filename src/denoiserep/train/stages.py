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
from ..convert import conversion_state, convert, set_trainable, unwrap
from ..fuse import fuse
from ..task_heads import task_heads
from .config import TrainConfig
from .distributed import DistInfo, average_batchnorm_statistics, barrier
from .engine import EpochSettings, NonFiniteLossError, train_one_epoch
from .outputs import StageResult, denoise_head, load_stage_weights, read_checkpoint, read_result

logger = logging.getLogger(__name__)

NOISE_LOSS_BATCHES = 4  # validation batches every noise-loss report of a denoise stage is measured on


@dataclass
class StageSpec:
    """What to run: ``stage`` is the recipe, ``variant`` the folder/row name (e.g. denoise-label-free).

    ``epochs`` and ``denoise_init`` override the run's ``extra_epochs`` / ``denoise_init`` for this
    variant (e.g. the demo's calibrated-only row: ``epochs=0, denoise_init="calibrate"``).
    """

    stage: str
    variant: str
    lam: float = 0.0
    epochs: int | None = None
    denoise_init: str | None = None


def run_stage(spec: StageSpec, cfg: TrainConfig, task, info: DistInfo, device: torch.device,
              *, resume: bool = False) -> StageResult:
    """Run one stage in ``<run>/<variant>`` (`denoiserep.train.rundir.check_run` has checked that
    this may write there); with ``resume`` a finished stage is reused and an unfinished one continued."""
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
    if not stages & {"denoise", "head"}:
        return
    with preserved_rng_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stage itself warns about what its conversion leaves out
        model = task.build_model().to(device)
        if "head" in stages:
            denoise_head(task, cfg, model)
        if "denoise" in stages:
            try:
                convert(task.conversion_root(model), cfg.denoise_config(),
                        example_inputs=task.conversion_inputs(model, device))
            except (ValueError, RuntimeError) as error:
                raise ValueError(f"the denoise stage's settings (denoise: {cfg.denoise}) do not apply to this model: "
                                 f"{error}") from None


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
            _, conversion = convert(self.task.conversion_root(model), self.cfg.denoise_config(),
                                    example_inputs=self.task.conversion_inputs(model, self.device), return_report=True)
            if self.info.is_main:
                tqdm.write(f"{self.spec.variant}: {conversion.summary()}", file=sys.stderr)
            # With the alternating option both roles train (in turns); start all trainable so the
            # optimizer holds every parameter, then `_set_phase` toggles requires_grad per epoch.
            set_trainable(model, denoisers=True, backbone=self.cfg.alternate_every is not None)
        elif stage == "head":
            model = self.task.wrap_with_head(model, denoise_head(self.task, self.cfg, model)).to(self.device)
            set_trainable(model, denoisers=True, backbone=False)
        return model

    def load_final(self, result: StageResult) -> nn.Module:
        """The finished stage's model, rebuilt from its saved (fused) weights."""
        return load_stage_weights(self.task, self.cfg, self.cfg.run_dir / result.weights, self.device,
                                  expected_stage=self.spec.stage)

    def _set_phase(self, model: nn.Module, epoch: int) -> str:
        """Frozen backbone (the paper) or the authors' alternation every K epochs."""
        if self.spec.stage not in ("denoise", "head"):
            return "all"
        if self.spec.stage == "denoise" and self.cfg.alternate_every:
            denoisers = (epoch // self.cfg.alternate_every) % 2 == 0
            set_trainable(model, denoisers=denoisers, backbone=not denoisers)
            return "denoisers" if denoisers else "backbone"
        return "denoisers"

    # -- the loop -----------------------------------------------------------------------------
    def run(self, resume: bool) -> StageResult:
        cfg, info = self.cfg, self.info
        model = self.build()
        resuming = resume and self.checkpoint_path.exists()
        if self.spec.stage == "denoise" and not resuming:
            self._initialise_denoisers(model)  # before the EMA copy and the optimizer see the parameters
        weight_decay = cfg.weight_decay if self.spec.stage in ("baseline", "control") else 0.0
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=self.lr, weight_decay=weight_decay)
        steps_per_epoch = len(self.task.train_loader(info, cfg.seed, 0, for_denoisers=self.spec.stage == "denoise"))
        scheduler = None
        if self.epochs > 0:
            scheduler, _ = create_scheduler_v2(
                optimizer, sched=cfg.sched, num_epochs=self.epochs,
                warmup_epochs=cfg.warmup_epochs if self.is_baseline else 0, decay_rate=cfg.sched_decay_rate,
                updates_per_epoch=steps_per_epoch, warmup_lr=self.lr * 0.01 if self.is_baseline else None,
            )
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
        start_epoch, num_updates, history = 0, 0, []
        if resuming:
            start_epoch, num_updates, history = self._load_checkpoint(model, optimizer, scheduler, ema)
            logger.info("%s: resuming after epoch %d", self.spec.variant, start_epoch - 1)
        train_model = self._wrap_ddp(model)
        settings = EpochSettings(
            lam=self.spec.lam, device=self.device, autocast_dtype=self.autocast_dtype, grad_clip=cfg.grad_clip,
            stage=self.spec.variant, show_progress=info.is_main,
        )
        for epoch in range(start_epoch, self.epochs):
            phase = self._set_phase(model, epoch)
            loader = self.task.train_loader(info, cfg.seed, epoch, for_denoisers=self.spec.stage == "denoise")
            extra = self.task.extra_loader(info, cfg.seed, epoch) if self.spec.lam > 0 else None
            try:
                train_stats, num_updates = train_one_epoch(
                    train_model, loader, optimizer, self.task, settings, epoch=epoch, num_updates=num_updates,
                    scheduler=scheduler, ema=ema, extra_loader=extra,
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
            # Epochs count from 1 everywhere a person reads them: the progress bar, this log, log.csv, plots.
            row = {"epoch": epoch + 1, "phase": phase, **train_stats, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(row)
            if info.is_main:
                tqdm.write(
                    f"{self.spec.variant} epoch {epoch + 1}/{self.epochs}: loss {train_stats['loss']:.4f} "
                    f"(task {train_stats['task_loss']:.4f}, denoise {train_stats['denoise_loss']:.4f}), "
                    f"val {self.task.primary_metric} {metrics[self.task.primary_metric]:.2f}, "
                    f"{train_stats['samples_per_s']:.0f} samples/s",
                    file=sys.stderr,
                )
                self._save_checkpoint(model, optimizer, scheduler, ema, epoch, num_updates, history)
                self._append_log(row)
                self._log_tensorboard(row)
            barrier()
        final = ema.module if ema is not None else model
        return self._finish(final, history)

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
        extra: dict = {}
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
