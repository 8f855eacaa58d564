"""The pipeline's report: the comparison table, seed statistics, plots and report.md."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import atomic_write


@dataclass
class Row:
    variant: str
    metric: list[float]  # one value per seed
    params: int
    flops: int
    latency_ms: float
    latency_ratio: float  # median over interleaved rounds of this variant's time / the baseline's
    fused_check: str = ""  # DenoiseRep rows: whether fused and unfused predictions agree
    noise_loss: list[float] = field(default_factory=list)  # DenoiseRep rows: L1 noise loss reached, per seed
    noise_loss_gap: list[float] = field(default_factory=list)  # its expected L2 minus the optimum, per seed
    other_metrics: dict[str, list[float]] = field(default_factory=dict)  # the task's further columns, per seed


def paired_delta(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean paired difference and the half-width of its 95% t-interval (nan for one seed)."""
    diffs = [a - b for a, b in zip(values, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    from scipy.stats import t

    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, half


def format_table(rows: list[Row], metric_label: str, baseline: str = "baseline", control: str = "control") -> str:
    """Markdown table; with several seeds, mean ± std and paired Δ with a 95% interval."""
    by_name = {r.variant: r for r in rows}
    base, ctrl = by_name[baseline], by_name.get(control)
    multi = len(base.metric) > 1
    others = list(base.other_metrics)
    header = ["variant", metric_label, "Δ vs baseline"]
    if multi and ctrl is not None:
        header.append("Δ vs control")
    header += others
    header += ["noise loss (L1)", "L2 gap to optimum", "params", "FLOPs", "latency (ms/batch)", "latency ratio",
               "fused == unfused"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, format_mean_std(row.metric)]
        cells.append("—" if row is base else format_delta(row.metric, base.metric))
        if multi and ctrl is not None:
            cells.append("—" if row in (base, ctrl) else format_delta(row.metric, ctrl.metric))
        cells += [format_mean_std(row.other_metrics[name]) for name in others]
        cells += [
            f"{statistics.fmean(row.noise_loss):.4f}" if row.noise_loss else "—",
            f"{statistics.fmean(row.noise_loss_gap):.4f}" if row.noise_loss_gap else "—",
            f"{row.params:,}",
            _si(row.flops),
            f"{row.latency_ms:.2f}",
            f"{row.latency_ratio:.3f}",
            row.fused_check or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_delta(values: list[float], reference: list[float]) -> str:
    """Paired mean difference with its 95% interval (without one for a single seed)."""
    mean, half = paired_delta(values, reference)
    return f"{mean:+.2f}" if math.isnan(half) else f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def plot_report(run_dir: Path, histories: dict[str, list[dict]], rows: list[Row], metric_label: str,
                noise_losses: dict[str, dict] | None = None) -> list[Path]:
    """Loss curves per stage, the metric per variant, latency per variant and, for DenoiseRep
    variants, each layer's weight change and noise loss against its optimum (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [_save(loss_curves(histories), run_dir / "loss_curves.png")]

    names = [r.variant for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    means = [statistics.fmean(r.metric) for r in rows]
    errors = [statistics.stdev(r.metric) if len(r.metric) > 1 else 0.0 for r in rows]
    ax.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
    low = min(m - e for m, e in zip(means, errors))
    ax.set_ylim(max(0.0, low - 2.0), max(m + e for m, e in zip(means, errors)) + 1.0)
    ax.set(title=f"{metric_label} per variant", ylabel=metric_label)
    ax.tick_params(axis="x", rotation=20)
    paths.append(_save(fig, run_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [r.latency_ms for r in rows], color="tab:orange")
    ax.set(title="inference latency per variant (median, interleaved)", ylabel="ms / batch")
    ax.tick_params(axis="x", rotation=20)
    paths.append(_save(fig, run_dir / "latency.png"))
    if noise_losses:
        paths.append(plot_denoisers(run_dir / "denoisers.png", noise_losses))
    return paths


def loss_curves(histories: dict[str, list[dict]]):
    """Task loss (left) and noise-prediction loss (right) per stage and epoch, each on its own axis
    (their scales differ by orders of magnitude); a stage shows in a panel only if it computed that
    loss, and every epoch is a marker, so that a one-epoch stage is a visible point."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for number, (variant, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("task_loss", "denoise_loss")):
            values = [h[key] for h in history]
            if any(values):  # 0 throughout: the stage did not compute this loss (label-free, or no denoisers)
                ax.plot(epochs, values, marker="o", color=f"C{number}", label=variant)
    axes[0].set(title="task loss per stage", xlabel="epoch", ylabel="task loss")
    axes[1].set(title="noise-prediction loss per stage (the denoisers' own objective)", xlabel="epoch",
                ylabel="Loss_p")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no stage computed this loss", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_denoisers(path: Path, noise_losses: dict[str, dict]) -> Path:
    """Per layer (execution order): ‖W′ − W‖/‖W‖ after the stage, and the expected L2 noise loss at
    identity, at the end (solid) and at the closed-form optimum of the same layer inputs (dashed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for number, (variant, noise_loss) in enumerate(noise_losses.items()):
        layers, color = noise_loss["end"]["layers"], f"C{number}"
        index = range(len(layers))
        axes[0].plot(index, [layer["weight_change"] for layer in layers], marker=".", color=color, label=variant)
        axes[1].plot(index, [layer["l2"] for layer in layers], marker=".", color=color, label=f"{variant}")
        axes[1].plot(index, [layer["l2_optimum"] for layer in layers], linestyle="--", color=color)
        if number == 0:
            axes[1].plot(index, [layer["l2"] for layer in noise_loss["identity"]["layers"]], color="grey",
                         linestyle=":", label="identity init")
    axes[0].set(title="fused weight change per layer", xlabel="layer (execution order)", ylabel="‖W′ − W‖ / ‖W‖")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[1].set(title="expected L2 noise loss per layer (dashed: optimum)", xlabel="layer (execution order)",
                ylabel="L2 noise loss")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report(run_dir: Path, title: str, table: str, notes: list[str], plots: list[Path]) -> Path:
    lines = [f"# {title}", "", table, ""]
    lines += [f"- {note}" for note in notes]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(lines) + "\n"
    return atomic_write(run_dir / "report.md", lambda tmp: Path(tmp).write_text(text))
