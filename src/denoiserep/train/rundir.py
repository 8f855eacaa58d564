"""A run's directory: checked before anything is written, and held by one process at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .config import TrainConfig

# Fields that change where or how fast a run goes, not what it computes: they may differ on --resume.
RESUMABLE_CHANGES = {"output", "name", "device", "workers", "eval_batch_size", "threads", "compile"}
LOCK_NAME = ".lock"


def check_run(cfg: TrainConfig, stages: list, seeds: list[int], resume: bool) -> None:
    """Raise before anything is written if the run cannot go ahead: a stage with no finished
    baseline to start from, a stage folder that would be overwritten without ``resume``, or a
    ``resume`` with settings that change results (those are listed)."""
    for seed in seeds:
        seed_cfg = seed_config(cfg, seed, len(seeds))
        run_dir = seed_cfg.run_dir
        runs_baseline = any(spec.stage == "baseline" for spec in stages)
        if runs_baseline and not (resume and (run_dir / "baseline" / "result.json").exists()):
            _check_baseline_start(cfg)
        if not runs_baseline and not (run_dir / "baseline" / "result.json").exists():
            first = next(spec.stage for spec in stages)
            raise FileNotFoundError(
                f"stage '{first}' starts from the baseline, but {run_dir / 'baseline'} has no finished baseline. "
                "Run --stage baseline first (same --output/--name), or --stage all."
            )
        if resume:
            _check_same_settings(seed_cfg, run_dir / "config.yaml")
            continue
        for spec in stages:
            stage_dir = run_dir / spec.variant
            if (stage_dir / "result.json").exists():
                raise FileExistsError(
                    f"{stage_dir} already holds a finished stage. Pass --resume to reuse it, or choose another "
                    "--name / --output."
                )
            if stage_dir.exists() and any(stage_dir.iterdir()):
                raise FileExistsError(
                    f"{stage_dir} holds an unfinished stage. Pass --resume to continue it, or choose another --name."
                )


def _check_baseline_start(cfg: TrainConfig) -> None:
    """A baseline of 0 epochs is the model it starts from: that must be a trained one."""
    if cfg.epochs > 0:
        return
    if cfg.reset_classifier:
        raise ValueError("--reset-classifier starts a new classifier, which must be trained: give --epochs > 0")
    if not cfg.init and not cfg.model_kwargs.get("pretrained"):
        raise ValueError(
            "--epochs 0 trains no baseline, and without --init the 'baseline' would be the random initialisation. "
            "Pass --init CHECKPOINT (your trained model), a pretrained model ('{\"pretrained\": true, "
            "\"pretrained_cfg_overlay\": {\"file\": PATH}}' in --model-kwargs), or --epochs N to train one."
        )


def seed_config(cfg: TrainConfig, seed: int, num_seeds: int) -> TrainConfig:
    """The run of one seed: ``<run>/seed<k>`` when there are several seeds."""
    return dataclasses.replace(cfg, seed=seed, name=f"{cfg.name}/seed{seed}" if num_seeds > 1 else cfg.name)


def _check_same_settings(cfg: TrainConfig, saved_path: Path) -> None:
    if not saved_path.exists():
        return
    saved = TrainConfig.from_yaml(saved_path).to_dict()
    changed = [f"{key}: {saved.get(key)!r} → {value!r}" for key, value in cfg.to_dict().items()
               if key not in RESUMABLE_CHANGES and saved.get(key) != value]
    if changed:
        raise ValueError(
            f"--resume of {saved_path.parent} with other settings than it was run with ({'; '.join(changed)}). "
            "Finished stages would be reused under the new settings' name. Resume with the same settings, or "
            "start a new run (another --name; `denoiserep demo --fresh` for the demo)."
        )


@contextlib.contextmanager
def run_locks(cfg: TrainConfig, seeds: list[int]) -> Iterator[None]:
    """Hold every folder the run writes: the run folder and each seed's folder. A run of
    ``--seeds 0 1 --name ms`` and one of ``--name ms/seed1`` then cannot write one folder at once."""
    folders = dict.fromkeys([cfg.run_dir, *(seed_config(cfg, seed, len(seeds)).run_dir for seed in seeds)])
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(run_lock(folder))
        yield


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` exclusively for this process (an advisory ``flock``, released on exit,
    also when the process dies); a second run of the same directory fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FileExistsError(
                f"{run_dir} is in use by another denoiserep run ({holder}). Wait for it to finish, or choose "
                "another --name / --output."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        handle.flush()
        yield
    finally:
        handle.close()
