"""The accuracy study: seeds, both timestep settings, paired intervals against the control."""

from denoiserep.bench_accuracy import run_accuracy


def test_quick_accuracy_study_reports_every_variant_with_paired_intervals(tmp_path):
    text = run_accuracy(quick=True, output=tmp_path)
    assert "### digits (2 seeds" in text
    for row in ("| baseline |", "| control |", "| denoiserep-minus |",
                "| DenoiseRep label-free (authors) |", "| DenoiseRep label-aug (ddpm-spread) |",
                "| DenoiseRep label-free (ddpm-spread-f0.1) |"):
        assert row in text
    assert "[" in text  # 95% intervals of the paired differences
    # The second setting reuses each seed's baseline instead of retraining it.
    assert (tmp_path / "digits-ddpm-spread" / "seed1" / "baseline" / "result.json").exists()
