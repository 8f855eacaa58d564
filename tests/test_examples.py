"""The recipes in examples/ run as a user runs them (a fresh process, tiny offline data) and show what they claim."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path, *args) -> dict[str, float]:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--output", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(": ")
        if key.isidentifier() and value:
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values


@pytest.mark.slow
def test_the_hugging_face_trainer_recipe(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = run_example("hf_trainer.py", tmp_path, "--baseline-steps", "20", "--steps", "6")
    assert result["resume_max_difference"] == 0  # resume_from_checkpoint continues exactly
    assert result["checkpoint_reload_max_difference"] < 1e-5  # from_pretrained + load_adapter
    assert result["fuse_max_relative_error"] < 1e-5
    assert result["fused_accuracy"] == result["unfused_accuracy"]  # save_pretrained of the fused model
    assert (tmp_path / "fused" / "config.json").exists()


@pytest.mark.slow
def test_the_lightning_recipe(tmp_path):
    pytest.importorskip("lightning")
    result = run_example("lightning_module.py", tmp_path, "--baseline-epochs", "1", "--epochs", "2")
    assert result["norm_statistics_max_change"] == 0  # Lightning's model.train() leaves them frozen
    assert result["resume_max_difference"] == 0  # fit(ckpt_path=…) continues exactly
    assert result["fuse_max_relative_error"] < 1e-5
    assert result["fused_accuracy"] == result["unfused_accuracy"]
