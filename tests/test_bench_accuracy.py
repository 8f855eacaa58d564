"""The accuracy study: seeds, both timestep settings, calibrated and identity-initialised DenoiseRep,
paired intervals against the control, and the noise loss each row reached next to its optimum."""

from denoiserep.bench.accuracy import run_accuracy


def test_quick_accuracy_study_reports_every_variant_with_paired_intervals(tmp_path):
    text = run_accuracy(quick=True, output=tmp_path)
    assert "### digits (2 seeds" in text
    for row in ("| baseline |", "| control |", "| denoiserep-minus |",
                "| DenoiseRep calibrated (authors) |", "| DenoiseRep calibrated-label-aug (ddpm-spread) |",
                "| DenoiseRep identity-label-free (authors) |", "| DenoiseRep identity-label-aug (ddpm-spread) |"):
        assert row in text
    assert "[" in text  # 95% intervals of the paired differences
    assert "gap to optimum" in text and "- Noise loss:" in text
    # The second setting reuses each seed's baseline instead of retraining it.
    assert (tmp_path / "digits-ddpm-spread" / "seed1" / "baseline" / "result.json").exists()
