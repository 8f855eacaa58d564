"""The benchmark suite: quick mode end to end, the fused-FLOPs contract, the interleaved timer."""

import copy
import time

import pytest
import timm
import torch

import denoiserep as dr
from denoiserep import DenoiseConfig, bench
from denoiserep.bench import accuracy, calibration, inference, models, tables, training
from denoiserep.bench.settings import Settings
from denoiserep.timing import time_interleaved


def table_rows(text: str, header_start: str) -> list[dict[str, str]]:
    """Rows, keyed by column name, of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    header, rows = cells(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


def test_quick_mode_writes_the_expected_tables(tmp_path):
    out = tmp_path / "BENCH.md"
    # Accuracy is the pipeline owner's (its own tests time it); the hook is tested below.
    assert bench.main(["--quick", "--sections", "inference", "training", "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert not list(tmp_path.glob(".BENCH.md.*")), "the temporary file must be renamed into place"
    for heading in ("## Machine and command", "## 1. Inference cost", "## 2. Training cost", "## 3. Accuracy", "## GPU"):
        assert heading in text
    assert "python -m denoiserep.bench --quick --sections inference training --output" in text
    assert "## 3. Accuracy\n\nNot run" in text

    variants = {row["variant"]: row for row in table_rows(text, "| model | variant | params | GFLOPs")}
    matched = len(list(models.QUICK_VIT.build(Settings()).blocks)) * 4 + 1  # patch embed + 4 per block
    for variant in ("baseline", "converted (unfused)", "fused", f"DenoiseRep⁻ T={matched} (matched)", "DenoiseRep⁻ T=1"):
        assert variant in variants
    assert variants["fused"]["GFLOPs"] == variants["baseline"]["GFLOPs"]
    assert float(variants["converted (unfused)"]["GFLOPs"]) > float(variants["baseline"]["GFLOPs"])
    assert float(variants["baseline"]["ratio to baseline"]) == 1.0

    phases = table_rows(text, "| model | batch | phase |")
    assert [row["phase"] for row in phases] == [v.label for v in training.TRAIN_VARIANTS]
    assert all(int(row["peak memory (MiB)"]) > 0 for row in phases), "peak memory must be measured"
    assert "Fused FLOPs equal the baseline's" in text


def test_quick_calibration_section_times_calibration_against_a_forward_and_plots_convergence(tmp_path):
    out = tmp_path / "BENCH.md"
    assert bench.main(["--quick", "--sections", "calibration", "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "## 4. Calibration" in text
    costs = {row["mode"]: row for row in table_rows(text, "| model | mode | images |")}
    assert set(costs) == set(calibration.CALIBRATION_MODES)  # the default and in-sample, side by side
    for cost in costs.values():
        assert float(cost["ratio"]) > 0 and float(cost["calibrate (s)"]) > 0 and int(cost["passes"]) >= 1
    methods = {row["method"]: row for row in table_rows(text, "| method | wall time (s) |")}
    assert set(methods) == {"label-free training from identity (the paper)", "label-free training from calibrated",
                            "calibration only"}
    assert float(methods["calibration only"]["L1 noise loss reached"]) < float(
        methods["label-free training from identity (the paper)"]["L1 noise loss reached"])
    assert (tmp_path / "calibration_vs_training.png").exists()


def test_the_calibration_cost_verdict_reads_the_intervals_of_repeated_rounds():
    def row(ratio, ci, rounds=3):
        return calibration.CostRow("m", "mode", 64, 1.0, ratio, 0.5, 1, ratio, ci, rounds, 1.0)

    assert calibration.cost_verdict([row(2.5, (2.4, 2.8)), row(2.7, (2.6, 2.9))]) == "met"
    assert calibration.cost_verdict([row(2.5, (2.4, 2.8)), row(3.3, (3.1, 3.4))]) == "**missed**"
    assert calibration.cost_verdict([row(2.9, (2.7, 3.2)), row(2.7, (2.6, 2.9))]).startswith("not resolved")
    assert calibration.cost_verdict([row(2.9, (2.9, 2.9), rounds=1)]) == "met (one round)"
    assert calibration.cost_verdict([row(3.1, (3.1, 3.1), rounds=1)]) == "**missed** (one round)"


def test_fused_flops_equal_the_baseline_flops():
    settings = Settings()
    model = timm.create_model("resnet18", num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    baseline = inference.count_flops(model, (x,), settings)
    converted = copy.deepcopy(model)
    dr.convert(converted, DenoiseConfig(init="random"), example_inputs=x)
    unfused = inference.count_flops(converted.eval(), (x,), settings)
    dr.fuse(converted)
    assert inference.count_flops(converted, (x,), settings) == baseline < unfused


def test_interleaved_timer_returns_medians_and_per_round_ratios():
    calls = []

    def sleeper(name: str, seconds: float):
        def run():
            calls.append(name)
            time.sleep(seconds)

        return run

    fns = {"fast": sleeper("fast", 0.001), "slow": sleeper("slow", 0.02)}
    timings = time_interleaved(fns, "fast", rounds=6, warmup=1)
    assert calls[:2] == ["fast", "slow"]  # warm-up
    assert calls[2:6] == ["fast", "slow", "slow", "fast"]  # interleaved, order rotating each round
    assert timings["fast"].ratio == 1.0 and timings["fast"].ratio_iqr == 0.0
    assert timings["slow"].median_s > timings["fast"].median_s
    assert timings["slow"].ratio > 1.0
    low, high = timings["slow"].ratio_ci
    assert 1.0 < low <= timings["slow"].ratio <= high


def test_a_target_is_met_or_missed_only_where_the_interval_says_so():
    assert tables.verdict((0.99, 1.01), 0.98, 1.02) == "met"
    assert "missed" in tables.verdict((1.03, 1.10), 0.98, 1.02)
    assert "not resolved" in tables.verdict((0.97, 1.01), 0.98, 1.02)


def test_accuracy_section_is_the_accuracy_study_under_its_setup_text(monkeypatch):
    monkeypatch.setattr(accuracy, "run_accuracy", lambda quick: f"| accuracy table, quick={quick} |\n")
    text = bench.run(Settings(quick=True), sections=("accuracy",))
    assert "## 3. Accuracy\n\n" + accuracy.SETUP in text
    assert "| accuracy table, quick=True |" in text and "## 1. Inference cost\n\nNot run" in text


def test_the_paper_recipe_study_is_section_3b_kept_apart_from_section_3(monkeypatch, tmp_path):
    from denoiserep.bench import paper_recipe

    monkeypatch.setattr(paper_recipe, "run_paper_recipe",
                        lambda quick, output=None, dense=False: f"| recipe table, quick={quick}, runs={output} |\n")
    text = bench.run(Settings(quick=True), sections=("paper-recipe",), runs=tmp_path)
    assert "## 3b. The paper's recipe against its matched control\n\n" + paper_recipe.SETUP in text
    assert f"| recipe table, quick=True, runs={tmp_path} |" in text and "## 3. Accuracy\n\nNot run" in text
    previous = tmp_path / "BENCH.md"
    previous.write_text(text, encoding="utf-8")
    kept = bench.existing_sections(previous)
    assert "recipe table" in kept["paper-recipe"] and "recipe table" not in kept["accuracy"]


def test_sections_not_run_are_kept_from_the_previous_file(tmp_path):
    previous = tmp_path / "BENCH.md"
    previous.write_text(
        "# Benchmarks\n\n## Machine and command\n\nold machine\n\n## 2. Training cost\n\nold training\n\n"
        "## 3. Accuracy (5 seeds)\n\n### digits\n\nold accuracy\n\n## GPU\n\nold gpu\n", encoding="utf-8")
    kept = bench.existing_sections(previous)
    assert set(kept) == {"training", "accuracy", "gpu"}
    text = bench.run(Settings(quick=True), sections=(), kept=kept)
    assert "## 2. Training cost\n\nold training\n" in text
    assert "## 3. Accuracy (5 seeds)\n\n### digits\n\nold accuracy\n" in text
    assert "## 1. Inference cost\n\nNot run" in text and "old machine" not in text
    assert "| sections kept from the previous file | training, accuracy |" in text
    # GPU numbers pasted from benchmarks/gpu.sh outlive CPU runs; a section that measured nothing does not.
    assert text.endswith("## GPU\n\nold gpu\n")
    previous.write_text("# Benchmarks\n\n## GPU\n\nNot measured in this run (no GPU).\n", encoding="utf-8")
    assert "gpu" not in bench.existing_sections(previous)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_without_a_gpu_fails_fast_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert bench.main(["--device", "cuda", "--output", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_hands_bench_arguments_including_help_to_the_benchmark(capsys):
    from denoiserep import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--help"])
    assert exited.value.code == 0
    assert "--sections" in capsys.readouterr().out
