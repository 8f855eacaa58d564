"""The paper's own protocol (``--recipe paper``) beside the control it needs: is the gain the method,
or the extra training?

Per data set and seed, from one baseline: the recipe with our timesteps and with the authors' code's
(`DenoiseConfig.timestep_mapping`), the matched control (the same extra schedule, its backbone trained
in exactly the recipe's backbone epochs with the same learning rate per step, no denoisers), and our
calibrated DenoiseRep (every layer, label-free, each denoiser at its noise loss's optimum, no
training). Twice: after the short baseline of §3, and after a *converged* baseline (trained until its
validation metric stopped improving). Every stage keeps its best validation epoch; the numbers are
each stage's final weights on a held-out test split (half of the validation split) that selection
never reads.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..report import format_delta, format_mean_std, paired_delta
from ..tasks import create_task
from ..train.config import TrainConfig
from ..train.distributed import DistInfo
from ..train.pipeline import run_pipeline
from ..train.recipes import demo_values
from ..train.stages import StageSpec

# The recipe scaled to the embedded data sets: 20 extra epochs in four phases of K = 5 (denoisers,
# backbone, denoisers, backbone: 10 backbone epochs), one warm-up epoch; the authors: K = 10 of 120–240.
RECIPE = {"recipe": "paper", "extra_epochs": 20, "alternate_every": 5, "extra_warmup_epochs": 1}
SEEDS = [0, 1, 2, 3, 4]
DENSE_SEEDS = [0, 1, 2]
# Each data set's short baseline (§3's, or its demo's) and its converged one: a long cosine schedule
# that stops PATIENCE epochs after its best validation epoch and keeps that epoch.
PATIENCE = 10
DATASETS = {
    "digits": {"task": "classification", "data": "digits", "epochs": 20, "converged_epochs": 200},
    "mnist1d": {"task": "classification", "data": "mnist1d", "epochs": 30, "lr": 3e-3, "converged_epochs": 200},
    "digits-reid": {"task": "reid", "data": "digits-reid", "epochs": 40, "label_smoothing": 0.1,
                    "converged_epochs": 200},
}
# The dense demos (3 seeds, their demos' budgets, after their short baseline only: a converged detector
# or segmenter takes hours on a 2-core CPU), run with ``dense=True``.
DENSE_DATASETS = {
    "digit detection": {"task": "detection", "data": "digit-scenes"},
    "digit segmentation": {"task": "segmentation", "data": "digit-scenes"},
}
PAPER, AUTHORS, PAPER_CALIBRATED = "paper", "paper-authors-timesteps", "paper-calibrated-start"
CONTROL, CALIBRATED = "matched-control", "calibrated"
SPECS = [
    StageSpec("baseline", "baseline"),
    StageSpec("matched-control", CONTROL),
    StageSpec("denoise", PAPER, noise_weight=0.1),
    StageSpec("denoise", AUTHORS, noise_weight=0.1, denoise={"timestep_mapping": "authors-code"}),
    # The recipe at its most generous: its denoisers start at their noise loss's optimum, not at identity.
    StageSpec("denoise", PAPER_CALIBRATED, noise_weight=0.1, denoise_init="calibrate"),
    # Our default conversion (every layer, t_i = N − i + 1, L1), label-free at the closed-form optimum.
    StageSpec("denoise", CALIBRATED, 1.0, epochs=0, denoise_init="calibrate",
              denoise={"target_modules": None, "loss": "l1"}),
]
LABELS = {"baseline": "baseline", CONTROL: "matched control", PAPER: "paper recipe",
          AUTHORS: "paper recipe, authors' timesteps", PAPER_CALIBRATED: "paper recipe, calibrated start",
          CALIBRATED: "DenoiseRep calibrated (ours, no training)"}
REGIMES = ("short", "converged")

SETUP = """\
`denoiserep.bench.paper_recipe`: `--recipe paper` (docs/method.md §2b, `denoiserep.train.recipes`)
scaled to the embedded data sets: 20 extra epochs alternating every K = 5 (denoisers first, then the
backbone on the task loss through W′: 10 backbone epochs), noise weight 0.1 added to the task loss,
L1 + L2, `*mlp*` Linears of ViTs (every layer of CNNs), identity start, the learning rate restarted
(cosine over the extra epochs, 1 warm-up epoch). Rows per seed, all from one baseline: the recipe with
our timesteps (execution order, t_i = N − i + 1) and with the authors' code's (`authors-code`: N / N − 1
in every block), the **matched control** (the same extra schedule: epochs, optimizer, weight decay,
learning rate per step, warm-up, batch, EMA; its backbone trains in exactly the recipe's backbone epochs,
the same number of updates, no denoisers) and our calibrated DenoiseRep (every layer, label-free, at the
closed-form optimum, not trained). Every stage keeps its best validation epoch; the table reports each
stage's final weights on a **held-out test split** (half of the validation split, by class / identity /
image) that selection never reads. *Short*: the §3 baseline budget; *converged*: the baseline trained on
a 200-epoch cosine schedule until its validation metric has not improved for 10 epochs (its best epoch
kept). Δ are paired per seed with 95% t-intervals (`report.paired_delta`). With `--dense`, digit
detection and digit segmentation add 3 seeds each after their demos' short baselines, with the recipe
scaled to their demos as `denoiserep demo --recipe paper` does (detection: 2 extra epochs, K = 1;
segmentation: 10, K = 2); their converged baselines are not run (hours on a 2-core CPU).
"""


def run_paper_recipe(quick: bool = False, output: Path | None = None, only: list[str] | None = None,
                     dense: bool = False) -> str:
    """Run the study (on ``only`` of the data sets, if given; the dense demos too with ``dense``) and
    return its markdown section. The runs go to ``output`` (default: a temporary folder); stages an
    earlier call finished there are reused (``--resume``), so a later call with ``dense`` only trains
    the dense demos."""
    datasets = {**DATASETS, **(DENSE_DATASETS if dense else {})}
    datasets = {name: datasets[name] for name in (only or datasets)}
    root = Path(output) if output else Path(tempfile.mkdtemp(prefix="denoiserep-paper-recipe-"))
    jobs = [(name, regime, values, root, quick) for name, values in datasets.items()
            for regime in (REGIMES if "converged_epochs" in values else REGIMES[:1])]
    if quick:
        jobs = [("digits", "short", DATASETS["digits"], root, True)]
    # One process per run, one thread each: on a small machine single-threaded runs side by side
    # finish sooner than multi-threaded runs one after the other.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(min(2, len(jobs)), mp_context=context, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        studies = list(pool.map(_run_job, jobs))
    by_name: dict[str, list] = {}
    for (name, regime, *_), study in zip(jobs, studies):
        by_name.setdefault(name, []).append((regime, study))
    parts = [part for runs in by_name.values() for _, (table, verdict, _) in runs for part in (table, verdict)]
    summary = [_summary_line(name, [(regime, numbers) for regime, (*_, numbers) in runs])
               for name, runs in by_name.items()]
    return "\n\n".join([*parts, "### Verdicts\n\n" + "\n".join(summary)]) + "\n"


def config_for(name: str, regime: str, values: dict, root: Path, quick: bool) -> TrainConfig:
    """The run of one data set and regime: the task's demo settings, the recipe, the regime's baseline."""
    from ..tasks import task_class

    values = dict(values)
    converged_epochs = values.pop("converged_epochs", None)
    demo = task_class(values["task"]).demo_defaults
    # The dense demos keep their own (short) extra budget, scaled as `denoiserep demo --recipe paper` does.
    recipe = demo_values("paper", demo) if name in DENSE_DATASETS else {**demo, **RECIPE}
    fields = {**recipe, **values, "output": str(root), "name": f"{name.replace(' ', '-')}-{regime}"}
    if regime == "converged":
        fields.update(epochs=converged_epochs, baseline_patience=PATIENCE)
    if quick:
        fields.update(epochs=1, extra_epochs=2, alternate_every=1, extra_warmup_epochs=0,
                      model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    return TrainConfig.from_dict(fields)


def _run_job(job) -> tuple[str, str, dict]:
    name, regime, values, root, quick = job
    cfg = config_for(name, regime, values, root, quick)
    seeds = [0, 1] if quick else (DENSE_SEEDS if name in DENSE_DATASETS else SEEDS)
    task = create_task(cfg)
    result = run_pipeline(cfg, task, SPECS, seeds, DistInfo(), torch.device("cpu"), resume=True, latency_repeats=1)
    metrics = {spec.variant: [result.results[s][spec.variant].extra["test_metrics"][task.primary_metric]
                              for s in seeds] for spec in SPECS}
    stages = {variant: [result.results[s][variant] for s in seeds] for variant in metrics}
    numbers = {"label": task.metric_label, **{key: format_delta(metrics[a], metrics[b]) for key, (a, b) in {
        "recipe_vs_control": (PAPER, CONTROL), "authors_vs_control": (AUTHORS, CONTROL),
        "calibrated_start_vs_control": (PAPER_CALIBRATED, CONTROL), "recipe_vs_baseline": (PAPER, "baseline"),
        "control_vs_baseline": (CONTROL, "baseline"), "ours_vs_baseline": (CALIBRATED, "baseline")}.items()},
        "beats": {variant: _compare(metrics[variant], metrics[CONTROL]) for variant in (PAPER, AUTHORS, PAPER_CALIBRATED)}}
    return (_table(name, regime, cfg, seeds, task.metric_label, task.primary_metric, metrics, stages),
            _verdict(name, regime, numbers), numbers)


def _table(name: str, regime: str, cfg: TrainConfig, seeds: list[int], label: str, primary: str, metrics: dict,
           stages: dict) -> str:
    baseline, control = metrics["baseline"], metrics[CONTROL]
    epochs = [len(r.history) for r in stages["baseline"]]
    selected = [r.extra.get("selected_epoch") for r in stages["baseline"]]
    if regime == "converged":
        budget = (f"converged baseline: stopped after {min(epochs)}–{max(epochs)} epochs, best epoch "
                  f"{min(selected)}–{max(selected)}")
    else:
        budget = f"baseline {cfg.epochs} epochs"
    lines = [
        f"### {name}, {regime} baseline ({len(seeds)} seeds; {budget}; extra stages {cfg.extra_epochs} epochs, "
        f"K = {cfg.alternate_every})",
        "",
        f"| variant | test {label} (mean ± std) | Δ vs baseline [95% CI] | Δ vs matched control [95% CI] "
        f"| backbone updates | selected epoch (median) | validation {label}: selected / last epoch "
        "| noise loss (L1) | L2 gap to optimum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, values in metrics.items():
        results = stages[variant]
        noise = [r.extra["noise_loss"]["end"] for r in results] if results[0].stage == "denoise" else []
        cells = [
            LABELS[variant], format_mean_std(values),
            "—" if variant == "baseline" else format_delta(values, baseline),
            "—" if variant in ("baseline", CONTROL) else format_delta(values, control),
            "—" if variant == "baseline" else f"{statistics.fmean(r.extra['backbone_steps'] for r in results):.0f}",
            _median_epoch(results),
            _validation(results, f"val_{primary}"),
            f"{statistics.fmean(n['l1'] for n in noise):.4f}" if noise else "—",
            f"{statistics.fmean(n['l2_gap'] for n in noise):.4f}" if noise else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _validation(results, key: str) -> str:
    """Mean validation metric of the kept epoch and of the last one (what selection chose from)."""
    if not results[0].history:
        return "—"
    kept = statistics.fmean(r.history[r.extra["selected_epoch"] - 1][key] if "selected_epoch" in r.extra
                            else r.history[-1][key] for r in results)
    return f"{kept:.2f} / {statistics.fmean(r.history[-1][key] for r in results):.2f}"


def _median_epoch(results) -> str:
    epochs = [r.extra.get("selected_epoch") for r in results]
    return "—" if None in epochs else f"{statistics.median(epochs):g}"


def _compare(values: list[float], reference: list[float]) -> str:
    """"above" / "below" when the paired 95% interval excludes 0, else "same"."""
    mean, half = paired_delta(values, reference)
    return "above" if mean - half > 0 else "below" if mean + half < 0 else "same"


_WORDS = {"above": "beats its matched control", "below": "falls below its matched control",
          "same": "does not differ from its matched control (the 95% interval includes 0)"}


def _verdict(name: str, regime: str, numbers: dict) -> str:
    """The plain answer for one data set and regime: does the recipe beat its matched control, by how much."""
    label, beats = numbers["label"], numbers["beats"]
    return (f"**Verdict ({name}, {regime} baseline).** The paper recipe {_WORDS[beats[PAPER]]}: "
            f"{numbers['recipe_vs_control']} {label} points (with the authors' timesteps "
            f"{numbers['authors_vs_control']}; from calibrated denoisers {numbers['calibrated_start_vs_control']}, "
            f"which {_WORDS[beats[PAPER_CALIBRATED]].split(' (')[0]}). Against the baseline the recipe moves "
            f"{numbers['recipe_vs_baseline']}, and the matched control alone, the same extra training without "
            f"denoisers, {numbers['control_vs_baseline']}. Our calibrated DenoiseRep (no training): "
            f"{numbers['ours_vs_baseline']}.")


def _summary_line(name: str, runs: list[tuple[str, dict]]) -> str:
    """One line per data set: the recipe against its matched control after each baseline."""
    parts = [f"{regime} baseline: recipe − matched control {n['recipe_vs_control']} (authors' timesteps "
             f"{n['authors_vs_control']}, calibrated start {n['calibrated_start_vs_control']}); matched control − "
             f"baseline {n['control_vs_baseline']}" for regime, n in runs]
    wins = {verdict for _, n in runs for verdict in n["beats"].values()}
    answer = ("the recipe beats its matched control" if wins == {"above"} else
              "the recipe does not beat its matched control" if "above" not in wins else
              "the recipe beats its matched control in some settings only")
    return f"- **{name}** ({runs[0][1]['label']}): {answer}. " + "; ".join(parts) + "."
