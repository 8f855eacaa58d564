"""The training pipeline end to end on embedded data: stages, resume, DDP, the demo, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from denoiserep.cli import main
from denoiserep.train.config import TrainConfig

# A small, fast recipe on the embedded digits data (8×8 handwritten digits).
FAST = ["--data", "digits", "--epochs", "2", "--extra-epochs", "1", "--batch-size", "64",
        "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}']


def run_cli(tmp_path, *args, name="run"):
    return main(["train", *FAST, "--output", str(tmp_path), "--name", name, *args])


def result(tmp_path, variant, name="run"):
    return json.loads((tmp_path / name / variant / "result.json").read_text())


def test_all_stages_run_and_write_a_report_with_fused_weights(tmp_path, capsys):
    assert run_cli(tmp_path, "--stage", "all") == 0
    run = tmp_path / "run"
    denoised = ["denoiserep-calibrated", "denoiserep-label-free", "denoiserep-label-aug"]
    for variant in ["baseline", "control", "denoiserep-minus", *denoised]:
        assert (run / variant / "model.safetensors").exists()
        assert 0 <= result(tmp_path, variant)["metrics"]["top1"] <= 100
    for variant in denoised:
        extra = result(tmp_path, variant)["extra"]
        assert extra["prediction_changes"] == 0
        assert extra["unfused_metrics"]["top1"] == result(tmp_path, variant)["metrics"]["top1"]
    assert result(tmp_path, "denoiserep-calibrated")["history"] == []  # calibrated, not trained
    assert {"loss_curves.png", "accuracy.png", "latency.png", "denoisers.png", "report.md", "config.yaml"} <= {
        p.name for p in run.iterdir()}
    table = capsys.readouterr().out
    for column in ("variant", "top-1", "Δ vs baseline", "noise loss (L1)", "L2 gap to optimum", "params", "FLOPs",
                   "latency (ms/batch)", "latency ratio"):
        assert column in table
    assert TrainConfig.from_yaml(run / "config.yaml").data == "digits"


def test_fused_denoiserep_weights_load_into_the_original_architecture(tmp_path):
    from denoiserep import load_fused
    from denoiserep.tasks import create_task

    run_cli(tmp_path, "--stage", "baseline", "denoise", "--lambda", "0.5")
    cfg = TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    task = create_task(cfg)
    model = load_fused(task.build_model(), tmp_path / "run" / "denoiserep" / "model.safetensors")
    metrics = task.evaluate(model, __import__("denoiserep.train.distributed", fromlist=["DistInfo"]).DistInfo(), torch.device("cpu"))
    assert metrics["top1"] == result(tmp_path, "denoiserep")["metrics"]["top1"]


def test_a_denoise_stage_starts_at_the_calibrated_optimum_and_reports_its_noise_loss_at_each_point(tmp_path):
    assert run_cli(tmp_path, "--stage", "baseline", "denoise", "--label-free", "--schedule", "ddpm",
                   "--timestep-range", "1", "1000", "--calibrate-passes", "2") == 0
    noise = result(tmp_path, "denoiserep-label-free")["extra"]["noise_loss"]
    assert noise["calibration"]["passes"] == 2
    identity, calibrated, end = noise["identity"], noise["calibrated"], noise["end"]
    assert calibrated["l1"] < 0.6 * identity["l1"]
    assert calibrated["l2_gap"] < 0.05 * identity["l2_gap"]  # measured on validation batches: near, not at, 0
    assert end["l2_gap"] >= 0 and len(end["layers"]) == len(identity["layers"])
    calibration = noise["calibration"]  # on the training batches calibration held out
    assert calibration["held_out"] and calibration["l2_optimum"] <= calibration["l2_after"] < calibration["l2_before"]
    first_epoch = result(tmp_path, "denoiserep-label-free")["history"][0]
    assert first_epoch["denoise_loss"] < 0.7 * identity["l1"]  # training starts from the optimum


def test_identity_init_is_the_papers_start_and_zero_extra_epochs_is_calibration_only(tmp_path):
    assert run_cli(tmp_path, "--stage", "baseline", "denoise", "--label-free", "--denoise-init", "identity") == 0
    identity_run = result(tmp_path, "denoiserep-label-free")["extra"]["noise_loss"]
    assert "calibrated" not in identity_run
    assert identity_run["end"]["l1"] == pytest.approx(identity_run["identity"]["l1"], rel=0.01)  # barely moves
    assert run_cli(tmp_path, "--stage", "baseline", "denoise", "--label-free", "--extra-epochs", "0",
                   name="calibrated") == 0
    calibrated = result(tmp_path, "denoiserep-label-free", name="calibrated")
    assert calibrated["history"] == []
    assert calibrated["extra"]["noise_loss"]["end"] == calibrated["extra"]["noise_loss"]["calibrated"]
    assert calibrated["extra"]["prediction_changes"] == 0


def test_resuming_a_denoise_stage_keeps_its_noise_loss_history_and_does_not_calibrate_again(tmp_path):
    assert run_cli(tmp_path, "--stage", "baseline", "denoise", "--label-free") == 0
    stage = tmp_path / "run" / "denoiserep-label-free"
    finished = json.loads((stage / "result.json").read_text())
    (stage / "result.json").unlink()  # as if the run died after its last checkpoint
    assert run_cli(tmp_path, "--stage", "denoise", "--label-free", "--resume") == 0
    resumed = json.loads((stage / "result.json").read_text())
    for point in ("identity", "calibrated", "calibration"):
        assert resumed["extra"]["noise_loss"][point] == finished["extra"]["noise_loss"][point]
    assert resumed["metrics"] == finished["metrics"]


def test_later_stages_need_a_finished_baseline(tmp_path, capsys):
    assert run_cli(tmp_path, "--stage", "denoise") == 2
    assert "no finished baseline" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, capsys):
    run_cli(tmp_path, "--stage", "baseline")
    assert run_cli(tmp_path, "--stage", "baseline") == 2
    assert "--resume" in capsys.readouterr().err
    assert run_cli(tmp_path, "--stage", "baseline", "--resume") == 0


def test_seeds_report_mean_std_and_paired_intervals(tmp_path, capsys):
    assert run_cli(tmp_path, "--stage", "baseline", "control", "--seeds", "0", "1") == 0
    table = capsys.readouterr().out
    assert "±" in table and "[" in table  # mean ± std, and a 95% interval for the paired Δ
    assert (tmp_path / "run" / "seed1" / "control" / "result.json").exists()


def test_alternating_schedule_and_extra_unlabeled_data(tmp_path):
    from PIL import Image

    extra = tmp_path / "unlabeled"
    extra.mkdir()
    for i in range(70):
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy(), mode="L").save(extra / f"{i}.png")
    assert run_cli(tmp_path, "--stage", "baseline", "denoise", "--extra-epochs", "2", "--alternate-every", "1",
                   "--extra-data", str(extra)) == 0
    phases = [row["phase"] for row in result(tmp_path, "denoiserep")["history"]]
    assert phases == ["denoisers", "backbone"]


def test_the_demo_runs_end_to_end_in_a_reduced_setting(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--extra-epochs", "1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for variant in ("baseline", "control", "denoiserep-minus", "denoiserep-calibrated", "denoiserep-label-free",
                    "denoiserep-label-aug"):
        assert f"| {variant} |" in out
    assert (tmp_path / "demo" / "report.md").exists()


def _train_command(tmp_path, name, epochs, *extra):
    return [sys.executable, "-m", "denoiserep", "train", "--data", "digits", "--epochs", str(epochs),
            "--batch-size", "32", "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}',
            "--output", str(tmp_path), "--name", name, "--stage", "baseline", *extra]


def test_kill_9_mid_epoch_then_resume_gives_the_same_final_metrics(tmp_path):
    epochs = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_command(tmp_path, "straight", epochs), check=True, env=env, capture_output=True)
    victim = subprocess.Popen(_train_command(tmp_path, "killed", epochs), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "baseline" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "baseline" / "result.json").exists()
    subprocess.run(_train_command(tmp_path, "killed", epochs, "--resume"), check=True, env=env, capture_output=True)
    straight = json.loads((tmp_path / "straight" / "baseline" / "result.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "baseline" / "result.json").read_text())
    assert resumed["metrics"] == straight["metrics"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_ddp_with_two_gloo_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The label-free denoise stage runs its forwards under noise_loss_only: DDP must still
    # all-reduce the denoisers' gradients, which then come from the noise losses alone.
    stages = ["--stage", "baseline", "control", "denoise", "--label-free", "--extra-epochs", "1", "--device", "cpu"]
    subprocess.run(_train_command(tmp_path, "single", 2, *stages), check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = _train_command(tmp_path, "ddp", 2, *stages)
    proc = subprocess.run(torchrun + ddp[1:], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in ("baseline", "control", "denoiserep-label-free"):
        single = json.loads((tmp_path / "single" / variant / "result.json").read_text())
        multi = json.loads((tmp_path / "ddp" / variant / "result.json").read_text())
        assert multi["metrics"]["samples"] == single["metrics"]["samples"]
        assert multi["metrics"]["top1"] == pytest.approx(single["metrics"]["top1"], abs=0.2)
        assert multi["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-3)
    # Calibration merges the ranks' input statistics: the same optimum as one process on all the data.
    single, multi = (json.loads((tmp_path / run / "denoiserep-label-free" / "result.json").read_text())
                     ["extra"]["noise_loss"]["calibration"] for run in ("single", "ddp"))
    assert multi["l2_optimum"] == pytest.approx(single["l2_optimum"], rel=1e-3)  # as the baselines


def test_denoiser_training_keeps_the_frozen_backbones_batchnorm_statistics():
    from torch import nn

    import denoiserep as dr
    from denoiserep.tasks.base import TaskBase
    from denoiserep.train.engine import EpochSettings, train_one_epoch

    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    dr.convert(model, example_inputs=x)
    dr.set_trainable(model)
    stats = model[1].running_mean.clone()
    optimizer = torch.optim.SGD(dr.denoiser_parameters(model), lr=0.1)
    settings = EpochSettings(lam=0.5, device=torch.device("cpu"), show_progress=False)  # set_trainable froze them

    class CrossEntropy(TaskBase):  # the training half of the Task interface
        def training_loss(self, model, batch):
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets), {}

    train_one_epoch(model, [(x, y)] * 3, optimizer, CrossEntropy(TrainConfig()), settings, epoch=0, num_updates=0)
    assert torch.equal(model[1].running_mean, stats)
