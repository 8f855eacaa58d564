"""Run variants × seeds, then compare them honestly in one table and one report."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..report import Row, format_table, plot_report, write_report
from ..timing import forward_flops, time_interleaved
from .config import TrainConfig
from .distributed import DistInfo
from .outputs import read_result
from .rundir import check_run, run_locks, seed_config
from .stages import StageResult, StageSpec, check_stage_settings, noise_loss_line, run_stage

logger = logging.getLogger(__name__)


PAPER_VARIANT = "denoiserep-paper"


def variant_specs(stages: list[str], cfg: TrainConfig) -> list[StageSpec]:
    """Stage names → what runs. ``all`` is the full comparison of the demo; under ``--recipe paper``
    it is the baseline, the recipe and its matched control."""
    lam, weight = cfg.effective_lambda, cfg.noise_weight
    if weight is not None:
        denoise = StageSpec("denoise", PAPER_VARIANT if cfg.recipe == "paper" else "denoiserep", noise_weight=weight)
    else:
        denoise = StageSpec("denoise", "denoiserep-label-free" if lam == 1.0 else "denoiserep", lam)
    table = {
        "baseline": [StageSpec("baseline", "baseline")],
        "control": [StageSpec("control", "control")],
        "matched-control": [StageSpec("matched-control", "matched-control")],
        "head": [StageSpec("head", "denoiserep-minus", lam)],
        "denoise": [denoise],
        "all": [StageSpec("baseline", "baseline"), StageSpec("matched-control", "matched-control"), denoise]
        if cfg.recipe == "paper" else [
            StageSpec("baseline", "baseline"),
            StageSpec("control", "control"),
            StageSpec("head", "denoiserep-minus", lam if lam < 1.0 else 0.5),
            # Label-free DenoiseRep at its optimum, no training: the cheapest DenoiseRep there is.
            StageSpec("denoise", "denoiserep-calibrated", 1.0, epochs=0, denoise_init="calibrate"),
            StageSpec("denoise", "denoiserep-label-free", 1.0),
            StageSpec("denoise", "denoiserep-label-aug", lam if lam < 1.0 else 0.5, noise_weight=weight),
        ],
    }
    specs: list[StageSpec] = []
    for stage in stages:
        if stage not in table:
            raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(table)}")
        specs += [s for s in table[stage] if s not in specs]
    return specs


@dataclass
class PipelineResult:
    table: str
    rows: list[Row]
    results: dict[int, dict[str, StageResult]] = field(default_factory=dict)  # seed → variant → result
    report: Path | None = None


def run_pipeline(cfg: TrainConfig, task, specs: list[StageSpec], seeds: list[int], info: DistInfo,
                 device: torch.device, *, resume: bool = False, latency_repeats: int = 50) -> PipelineResult:
    """Each seed gets its own folder (``<run>/seed<k>`` when there are several seeds).

    ``task`` (e.g. `ClassificationTask`) holds the data and builds models; seeds only change
    initialisation, data order and noise, which the stages take from the seed directly.
    """
    check_run(cfg, specs, seeds, resume)  # before anything is written
    check_stage_settings(specs, cfg, task, device)
    results: dict[int, dict[str, StageResult]] = {}
    with run_locks(cfg, seeds) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            check_run(cfg, specs, seeds, resume)  # again under the locks: a run that held them may have written
        for seed in seeds:
            seed_cfg = seed_config(cfg, seed, len(seeds))
            if info.is_main:
                seed_cfg.run_dir.mkdir(parents=True, exist_ok=True)
                seed_cfg.save(seed_cfg.run_dir / "config.yaml")
            results[seed] = {}
            for spec in specs:
                logger.info("seed %d: %s", seed, spec.variant)
                results[seed][spec.variant] = run_stage(spec, seed_cfg, task, info, device, resume=resume)
        _add_finished_stages(cfg, task, seeds, results, info, device)
        return _finish(cfg, task, seeds, results, info, device, latency_repeats)


def _add_finished_stages(cfg: TrainConfig, task, seeds: list[int], results: dict[int, dict[str, StageResult]],
                         info: DistInfo, device: torch.device) -> None:
    """Every stage the run folder holds, finished for every seed, joins this run's results (a run of
    ``--stage control denoise`` reports them beside the baseline trained before), in the order of
    ``--stage all`` and then by name."""
    folders = [{path.parent.name: path for path in seed_config(cfg, s, len(seeds)).run_dir.glob("*/result.json")}
               for s in seeds]
    canonical = [spec.variant for spec in variant_specs(["all"], cfg)]

    def order(variant: str) -> tuple[int, str]:
        return canonical.index(variant) if variant in canonical else len(canonical), variant

    finished = sorted(set.intersection(*(set(f) for f in folders)), key=order)
    for seed, found in zip(seeds, folders):
        seed_cfg = seed_config(cfg, seed, len(seeds))
        for variant in finished:
            if variant not in results[seed]:
                stage = read_result(found[variant]).stage
                results[seed][variant] = run_stage(StageSpec(stage, variant), seed_cfg, task, info, device,
                                                   resume=True)
        results[seed] = {variant: results[seed][variant] for variant in sorted(results[seed], key=order)}


def _finish(cfg: TrainConfig, task, seeds: list[int], results: dict[int, dict[str, StageResult]], info: DistInfo,
            device: torch.device, latency_repeats: int) -> PipelineResult:
    """The comparison table, its plots and report.md (main process)."""
    rows = _rows(results, task, device, latency_repeats) if info.is_main else []
    table = format_table(rows, task.metric_label) if rows and "baseline" in results[seeds[0]] else ""
    pipeline = PipelineResult(table, rows, results)
    if info.is_main and table:
        histories = {v: r.history for v, r in results[seeds[0]].items()}
        noise_losses = {v: r.extra["noise_loss"] for v, r in results[seeds[0]].items() if r.stage == "denoise"}
        plots = plot_report(cfg.run_dir, histories, rows, task.metric_label, noise_losses)
        pipeline.report = write_report(cfg.run_dir, f"DenoiseRep on {cfg.data}", table, _notes(cfg, seeds, results), plots)
        cfg.save(cfg.run_dir / "config.yaml")
    return pipeline


def on_test_split(results: dict[int, dict[str, StageResult]]) -> bool:
    """Whether every stage of the run reported its final weights on a held-out test split."""
    return all("test_metrics" in r.extra for by_variant in results.values() for r in by_variant.values())


def reported_metrics(result: StageResult, on_test: bool) -> dict:
    """The metrics a table shows for a stage: on the held-out test split when the run has one."""
    return result.extra["test_metrics"] if on_test else result.metrics


def _rows(results, task, device: torch.device, repeats: int) -> list[Row]:
    """One row per variant; cost columns measured once, on the first seed's models, side by side."""
    first = next(iter(results.values()))
    models = {v: r.model for v, r in first.items() if r.model is not None}
    batch = task.example_inputs(device, batch=task.cfg.eval_batch_size)
    for model in models.values():
        model.eval()
    with torch.inference_mode():
        latency = time_interleaved({v: (lambda m=m: m(batch)) for v, m in models.items()}, next(iter(models)),
                                   rounds=repeats, warmup=3, desc="latency")
    on_test = on_test_split(results)
    reported = {s: {v: reported_metrics(r, on_test) for v, r in by_variant.items()} for s, by_variant in results.items()}
    rows = []
    for variant, model in models.items():
        metric = [reported[s][variant][task.primary_metric] for s in results]
        others = {name: [reported[s][variant][name] for s in results] for name in task.other_metrics}
        noise = [results[s][variant].extra["noise_loss"]["end"] for s in results] \
            if first[variant].stage == "denoise" else []
        rows.append(Row(
            variant=variant,
            metric=metric,
            params=sum(p.numel() for p in model.parameters()),
            flops=forward_flops(model, batch),
            latency_ms=latency[variant].median_s * 1e3,
            latency_ratio=latency[variant].ratio,
            fused_check=task.fused_check([results[s][variant] for s in results])
            if first[variant].stage == "denoise" else "",
            noise_loss=[report["l1"] for report in noise],
            noise_loss_gap=[report["l2_gap"] for report in noise],
            other_metrics=others,
        ))
    return rows


def _notes(cfg: TrainConfig, seeds: list[int], results) -> list[str]:
    first = results[seeds[0]]
    notes = [
        f"data `{cfg.data}`, model `{cfg.model or 'default for the data'}`, seeds {seeds}; baseline "
        f"{cfg.epochs} epochs, control / DenoiseRep / DenoiseRep⁻ {cfg.extra_epochs} extra epochs each "
        f"at lr {cfg.extra_lr} (control trains the whole backbone for the same steps: it is the fair reference).",
        "DenoiseRep rows are evaluated after fusion: the fused model is the baseline architecture "
        "(same params and FLOPs); 'fused == unfused' compares every validation prediction.",
        "DenoiseRep⁻ keeps its denoising head at inference: its extra params, FLOPs and latency are real.",
        f"noise loss: the denoisers' own objective at the end of the stage, L1 summed over the converted layers "
        f"on the first validation batches with fixed noise; 'L2 gap' is its exact expected L2 minus the "
        f"closed-form optimum on the same batches (0 = the best a linear denoiser can do). Denoise stages start "
        f"from `{cfg.denoise_init}` (calibration: up to {cfg.calibrate_batches} training batches); "
        "`denoiserep-calibrated` is calibrated and not trained.",
        "Latency: median of interleaved runs on one batch of the validation set, ratio to the baseline.",
    ]
    if cfg.recipe:
        notes.insert(1, f"recipe `{cfg.recipe}` (`denoiserep.train.recipes`): alternating every {cfg.alternate_every} "
                        f"epochs, noise weight {cfg.noise_weight}, loss {cfg.denoise_config().loss}; `matched-control` "
                        "trains the backbone in exactly the recipe's backbone epochs, with its learning rate per step "
                        "and no denoisers.")
    if on_test_split(results):
        selected = "the best validation epoch" if cfg.select == "best" else "the last epoch"
        notes.insert(1, f"metrics on the held-out test split ({100 * cfg.test_fraction:.0f}% of the validation "
                        f"split, read once per stage after training); each stage keeps {selected}, chosen on the "
                        "rest of the validation split.")
    elif cfg.select == "best":
        notes.insert(1, "each stage keeps its best validation epoch, and the table reports that same validation "
                        "split: the numbers are optimistic (--test-fraction holds out a test split).")
    for variant, result in first.items():
        if result.stage == "denoise":
            notes.append(
                f"{variant}: {noise_loss_line(result.extra['noise_loss'])}; "
                f"max relative error fused vs unfused {result.extra['fuse_max_relative_error']:.2e}; "
                f"fused weights in `{result.weights}`."
            )
    return notes
