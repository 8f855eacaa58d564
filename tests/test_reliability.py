"""Hostile and careless input: files that try to run code, fusions that would be silently wrong,
runs that would overwrite each other, and settings that would crash or be ignored."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import stat
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import denoiserep as dr
from denoiserep.checkpoint import FILE_MODE, UntrustedFileError, load_converted, save_converted
from denoiserep.cli import main, set_threads
from denoiserep.train.config import TrainConfig
from denoiserep.train.rundir import run_lock

from conftest import relative_error

FAST = ["--data", "digits", "--epochs", "2", "--extra-epochs", "1", "--batch-size", "64",
        "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']


def train(output, *args, name="run"):
    return main(["train", *FAST, "--output", str(output), "--name", name, *args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A baseline and a label-free denoise stage, finished (shared by the tests that only read it)."""
    output = tmp_path_factory.mktemp("runs")
    assert train(output, "--stage", "baseline", "denoise", "--label-free") == 0
    return output / "run"


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- files that try to run code --------------------------------------------------------------------


def test_a_crafted_checkpoint_is_refused_by_fuse_and_resume_and_nothing_runs(finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stage = run / "denoiserep-label-free"
    torch.save({"conversion": {}, "model": RunsCode(marker)}, stage / "checkpoint.pt")
    assert main(["fuse", str(stage)]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "posix.system" in err
    (stage / "result.json").unlink()  # an unfinished stage: --resume reads its checkpoint
    assert train(tmp_path, "--stage", "denoise", "--label-free", "--resume") == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_load_converted_refuses_a_crafted_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "denoiserep-converted/1", "extra": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedFileError, match="refusing to load"):
        load_converted(nn.Sequential(nn.Linear(2, 2)), tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_converted_checkpoint_with_plain_extra_data_still_round_trips(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    dr.convert(model, example_inputs=torch.randn(2, 4))
    save_converted(model, tmp_path / "c.pt", extra={"epoch": 3, "history": [{"loss": 0.5}], "name": "x"})
    assert load_converted(nn.Sequential(nn.Linear(4, 4)), tmp_path / "c.pt")["history"] == [{"loss": 0.5}]


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    from denoiserep.tasks.classification.data import load_classification_data

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(UntrustedFileError, match="posix.system"):
        load_classification_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_run_outputs_follow_the_users_umask(finished_run):
    assert FILE_MODE == 0o666 & ~_current_umask()
    for name in ("config.yaml", "baseline/result.json", "baseline/model.safetensors", "baseline/checkpoint.pt"):
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == FILE_MODE, name


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- fusions that would be silently wrong ----------------------------------------------------------


def fused_matches_unfused(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        unfused = model.eval()(x)
        dr.fuse(model)
        return relative_error(model(x), unfused)


def test_tied_weights_get_no_denoiser_and_the_user_is_told_which():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    model, x = Tied(), torch.randn(4, 6)
    with pytest.warns(UserWarning, match=r"a \(shares parameters with b\); b \(shares parameters with a\)"):
        dr.convert(model, dr.DenoiseConfig(init="random"), example_inputs=x)
    assert [name for name, _, _ in dr.layer_denoisers(model)] == ["head"]
    assert fused_matches_unfused(model, x) <= 1e-5


class ConvReluBn(nn.Module):
    """A bias-free conv whose output goes through an in-place activation before the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


class ConvBnPlusResidual(nn.Module):
    """A bias-free conv whose output feeds the BatchNorm and a residual sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("build", [ConvReluBn, ConvBnPlusResidual], ids=["inplace-between", "residual"])
def test_a_batchnorm_that_is_not_the_sole_direct_consumer_gets_no_folded_constant(build):
    torch.manual_seed(0)
    model = build()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dr.convert(model, dr.DenoiseConfig(init="random", schedule="ddpm", timestep_range=(1, 1000),
                                           keep_state_dict_keys=False), example_inputs=x)
    if build is ConvBnPlusResidual:
        assert any("also used elsewhere" in str(w.message) for w in caught)
    assert next(d for _, _, d in dr.layer_denoisers(model)).following_norm is None
    assert fused_matches_unfused(model, x) <= 1e-5


def test_the_cli_fuse_checks_fused_against_unfused_on_real_inputs_and_fails_loudly(tmp_path, capsys):
    args = ["--data", "digits", "--model", "resnet10t", "--epochs", "1", "--extra-epochs", "0", "--batch-size", "64"]
    assert main(["train", *args, "--stage", "baseline", "denoise", "--label-free", "--output", str(tmp_path)]) == 0
    stage = tmp_path / "run" / "denoiserep-label-free"
    torch.save(_checkpoint_after_calibration(tmp_path / "run"), stage / "checkpoint.pt")
    assert main(["fuse", str(stage), "--output", str(tmp_path / "ok.safetensors")]) == 0
    assert "fused == unfused on" in capsys.readouterr().out
    # A plan that folds a constant into a BatchNorm the layer does not feed (as a wrong fold would).
    payload = torch.load(stage / "checkpoint.pt", weights_only=True)
    plan = {entry["name"]: entry for entry in payload["conversion"]["plan"]}
    plan["layer1.0.conv1"]["following_norm"] = "layer1.0.bn2"
    payload["model"]["layer1.0.conv1.parametrizations.weight.0.a"] += 1000.0  # a constant large enough to show
    torch.save(payload, stage / "checkpoint.pt")
    assert main(["fuse", str(stage), "--output", str(tmp_path / "bad.safetensors")]) == 2
    assert "fused outputs differ" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def _checkpoint_after_calibration(run_dir):
    """What a denoise stage's checkpoint holds (a 0-epoch stage saves none: make one)."""
    from denoiserep.convert import conversion_state
    from denoiserep.tasks import create_task

    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    task = create_task(cfg)
    model = dr.load_fused(task.build_model(), run_dir / "baseline" / "model.safetensors")
    dr.convert(model, cfg.denoise_config(), example_inputs=task.example_inputs(torch.device("cpu")))
    dr.calibrate(model, [x for x in task.validation_inputs(1)], progress=False)
    return {"epoch": 0, "model": model.state_dict(), "conversion": conversion_state(model).to_dict()}


def test_multihead_attention_out_proj_and_unsupported_layers_are_named_not_silently_wrong():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.up, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.ConvTranspose1d(8, 8, 1), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.mha(x, x, x)[0])

    model, x = Attention(), torch.randn(2, 5, 8)
    with pytest.warns(UserWarning) as caught:
        dr.convert(model, dr.DenoiseConfig(init="random"))  # no example_inputs: nothing proves what runs
    messages = " ".join(str(w.message) for w in caught)
    assert "mha.out_proj" in messages and "mha.in_proj_weight" in messages and "up (ConvTranspose1d)" in messages
    assert [name for name, _, _ in dr.layer_denoisers(model)] == ["fc"]
    assert fused_matches_unfused(model, x) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fusion_is_checked_against_its_own_rounding_and_the_error_names_the_cause(dtype):
    x = torch.randn(8, 16, dtype=dtype)

    def converted():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(dtype)
        config = dr.DenoiseConfig(init="random", schedule="ddpm", timestep_range=(1, 1000))
        return dr.convert(model, config, example_inputs=x)

    dr.fuse(converted(), example_inputs=x)  # the default tolerance follows the dtype: no false alarm
    with pytest.raises(dr.FusionError, match=f"tolerance for a {str(dtype).removeprefix('torch.')} model"):
        dr.fuse(converted(), example_inputs=x, tolerance=1e-9)


# -- runs that would overwrite each other ----------------------------------------------------------


def test_a_second_run_of_the_same_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    with run_lock(tmp_path / "run"):
        assert train(tmp_path, "--stage", "baseline") == 2
    err = capsys.readouterr().err
    assert "in use by another denoiserep run" in err and f"pid {os.getpid()}" in err
    assert not (tmp_path / "run" / "baseline").exists()


def test_resume_with_settings_that_change_results_is_refused_and_lists_them(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "config.yaml").read_text()
    assert train(tmp_path, "--stage", "baseline", "--label-free", "--resume", "--epochs", "8", "--lr", "0.5") == 2
    err = capsys.readouterr().err
    assert "epochs: 2 → 8" in err and "lr: 0.002 → 0.5" in err
    assert (run / "config.yaml").read_text() == before
    assert train(tmp_path, "--stage", "baseline", "--label-free", "--resume", "--eval-batch-size", "128") == 0


def test_a_moved_run_keeps_working_because_its_weights_are_stored_relative_to_it(finished_run, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run, moved)
    result = json.loads((moved / "denoiserep-label-free" / "result.json").read_text())
    assert result["weights"] == "denoiserep-label-free/model.safetensors"
    monkeypatch.chdir(tmp_path)  # another working directory too
    assert train(tmp_path / "elsewhere", "--stage", "baseline", "denoise", "--label-free", "--resume") == 0


def test_a_run_written_before_weights_were_stored_relative_to_it_still_continues(finished_run, tmp_path, monkeypatch):
    old = tmp_path / "runs" / "run"
    shutil.copytree(finished_run, old)
    for result_file in old.glob("*/result.json"):
        result = json.loads(result_file.read_text())
        result["weights"] = f"runs/run/{result_file.parent.name}/model.safetensors"  # as written from tmp_path
        result_file.write_text(json.dumps(result))
    monkeypatch.chdir(finished_run.parent)  # not where the paths were written from
    assert train(tmp_path / "runs", "--stage", "baseline", "denoise", "--label-free", "--resume") == 0


def test_the_demo_just_works_again_after_an_interrupted_run_and_fresh_starts_over(tmp_path, capsys):
    demo = ["demo", "--epochs", "1", "--extra-epochs", "1", "--output", str(tmp_path)]
    assert main(demo) == 0
    (tmp_path / "demo" / "denoiserep-label-aug" / "result.json").unlink()  # as if killed in its last stage
    assert main(demo) == 0
    assert "continuing it" in capsys.readouterr().out
    assert main([*demo, "--fresh"]) == 0
    assert "starting over" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--stage", "denoise"], ["--stage", "baseline", "--model", "no_such_model"]])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, args):
    assert train(tmp_path, *args) == 2
    assert not (tmp_path / "run").exists()


# -- settings that would crash or be ignored -------------------------------------------------------


@pytest.mark.parametrize("yaml_text, message", [
    ("epochs: three\n", "epochs must be an integer, got 'three'"),
    ("epochs: 1.7\n", "epochs must be an integer, got 1.7"),
    ("model_kwargs: 5\n", "model_kwargs must be a mapping"),
    ("epochs: [1\n", "is not valid YAML"),
])
def test_wrong_yaml_values_and_syntax_give_one_line_and_write_nothing(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--model-kwargs", "[1, 2]"], "model_kwargs must be a mapping"),
    (["--image-size", "0"], "image_size must be positive, got 0"),
])
def test_wrong_flag_values_are_refused_not_replaced(tmp_path, capsys, args, message):
    assert main(["train", "--data", "digits", *args, "--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def imagefolder(root, bad: dict[str, bytes]):
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    for name, content in bad.items():
        (root / "train" / "a" / name).write_bytes(content)


@pytest.mark.parametrize("content", [b"not an image at all", None], ids=["fake", "truncated"])
def test_an_unreadable_image_is_named_or_skipped_with_the_flag(tmp_path, capsys, content):
    if content is None:  # a real JPEG, cut in half
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "full.jpg")
        content = (tmp_path / "full.jpg").read_bytes()
        content = content[: len(content) // 2]
    imagefolder(tmp_path / "data", {"broken.jpg": content})
    args = ["train", "--data", f"imagefolder:{tmp_path / 'data'}", "--model", "resnet10t", "--image-size", "32",
            "--epochs", "1", "--batch-size", "4", "--stage", "baseline", "--output", str(tmp_path / "runs")]
    assert main([*args, "--name", "strict"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-bad-images" in err
    assert main([*args, "--name", "lenient", "--skip-bad-images"]) == 0


def test_a_truncated_or_foreign_weights_file_is_named(finished_run, tmp_path, capsys):
    weights = (finished_run / "baseline" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(weights[: len(weights) // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    for path in (tmp_path / "cut.safetensors", tmp_path / "model.pt"):
        assert main(["evaluate", "--config", str(finished_run / "config.yaml"), "--weights", str(path)]) == 2
        assert f"{path} is not a readable .safetensors file" in capsys.readouterr().err


def test_small_models_train_on_one_thread_unless_told_otherwise():
    before = torch.get_num_threads()
    try:
        set_threads(TrainConfig(), nn.Linear(10, 10))
        assert torch.get_num_threads() == 1
        set_threads(TrainConfig(threads=2), nn.Linear(10, 10))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- non-finite values: a NaN never passes a check (issue 19, item 2) ------------------------------


def converted_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    return dr.convert(model, dr.DenoiseConfig(init="random"), example_inputs=torch.randn(4, 6))


@pytest.mark.parametrize("breakage", ["denoiser", "weight", "inputs"])
def test_fuse_fails_by_name_when_a_tensor_or_an_output_is_not_finite(breakage):
    model, x = converted_mlp(), torch.randn(4, 6)
    with torch.no_grad():
        if breakage == "denoiser":
            next(d for _, _, d in dr.layer_denoisers(model)).a[0] = float("nan")
        elif breakage == "weight":
            model[2].parametrizations.weight.original[0, 0] = float("inf")
        else:
            x[1, 2] = float("nan")
    match = {"denoiser": r"0 denoiser a", "weight": r"2\.weight", "inputs": "outputs NaN on example_inputs before"}
    with pytest.raises(dr.FusionError, match=match[breakage]):
        dr.fuse(model, example_inputs=x)
    assert dr.is_converted(model)  # found before fusion: the model is left as it was


def test_the_fused_outputs_relative_error_is_nan_when_an_output_is_nan_and_never_within_a_tolerance():
    from denoiserep.finite import within, worst
    from denoiserep.fuse import max_relative_error

    reference = [torch.ones(3), torch.ones(2)]
    for broken in (torch.tensor([1.0, float("nan"), 1.0]), torch.tensor([1.0, float("inf"), 1.0])):
        error = max_relative_error(reference, [broken, torch.ones(2)])
        assert not within(error, 1e-4)
    assert max_relative_error(reference, [torch.ones(3), torch.ones(2)]) == 0.0
    assert np.isnan(worst([0.5, float("nan"), 0.1])) and worst([0.5, 0.1]) == 0.5


def test_an_infinity_both_outputs_share_does_not_hide_the_other_differences():
    from denoiserep.finite import within
    from denoiserep.fuse import max_relative_error

    masked = torch.tensor([1.0, 2.0, -float("inf")])  # e.g. logits under a −inf attention mask
    assert max_relative_error([masked], [masked.clone()]) == 0.0
    error = max_relative_error([masked], [torch.tensor([100.0, 2.0, -float("inf")])])
    assert error == pytest.approx(99.0 / 2.0) and not within(error, 1e-4)


def test_denoiserep_fuse_refuses_a_checkpoint_with_non_finite_denoisers_and_writes_nothing(finished_run, tmp_path,
                                                                                           capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stage = run / "denoiserep-label-free"
    payload = torch.load(stage / "checkpoint.pt", weights_only=True)
    key = next(k for k in payload["model"] if k.endswith("parametrizations.weight.0.a"))
    payload["model"][key][0] = float("nan")
    torch.save(payload, stage / "checkpoint.pt")
    assert main(["fuse", str(stage), "--output", str(tmp_path / "fused.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "Nothing was fused" in err
    assert not (tmp_path / "fused.safetensors").exists()


def test_fused_checks_of_every_task_say_no_for_a_nan_difference():
    from denoiserep.tasks.classification.task import ClassificationTask
    from denoiserep.tasks.reid.task import ReidTask
    from denoiserep.train.stages import StageResult

    logits = torch.randn(4, 3)
    broken = logits.clone()
    broken[0, logits[0].argmax()] = float("nan")  # argmax takes NaN as the largest: the same predictions
    extra = ClassificationTask.compare_outputs(None, logits, broken)
    result = StageResult("d", "denoise", {"top1": 50.0}, extra={**extra, "unfused_metrics": {"top1": 50.0}})
    assert ClassificationTask.fused_check(None, [result]).startswith("NO")
    seeds = [StageResult("d", "denoise", {"mAP": 50.0}, extra={"unfused_metrics": {"mAP": 50.0},
                                                                "fused_vs_unfused_max_relative_error": error})
             for error in (1e-8, float("nan"))]
    assert ReidTask.fused_check(ReidTask.__new__(ReidTask), seeds).startswith("NO")


# -- files of another dtype (item 3) ---------------------------------------------------------------


def test_a_checkpoint_cast_to_integers_is_refused_by_fuse(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stage = run / "denoiserep-label-free"
    payload = torch.load(stage / "checkpoint.pt", weights_only=True)
    payload["model"] = {k: v.long() for k, v in payload["model"].items()}
    torch.save(payload, stage / "checkpoint.pt")
    assert main(["fuse", str(stage), "--output", str(tmp_path / "fused.safetensors")]) == 2
    assert "dtype mismatch" in capsys.readouterr().err
    assert not (tmp_path / "fused.safetensors").exists()


@pytest.mark.parametrize("cast", [torch.int64, torch.bool])
def test_weights_of_integers_or_bools_are_not_evaluated(finished_run, tmp_path, capsys, cast):
    from safetensors.torch import load_file, save_file

    state = load_file(finished_run / "baseline" / "model.safetensors")
    save_file({k: v.to(cast) for k, v in state.items()}, tmp_path / "cast.safetensors")
    assert main(["evaluate", "--config", str(finished_run / "config.yaml"),
                 "--weights", str(tmp_path / "cast.safetensors")]) == 2
    assert f"checkpoint {tmp_path / 'cast.safetensors'}" in (err := capsys.readouterr().err) and "dtype mismatch" in err


# -- checkpoints that lack what the run wrote (item 13) --------------------------------------------


@pytest.mark.parametrize("breakage, message", [
    ("no_model", r"missing fields \['model'\]"),
    ("no_epoch", r"missing fields \['epoch'\]"),
    ("string_conversion", r"conversion \(str\)"),
    ("wrong_plan", "its conversion does not apply"),
    ("list", "holds a list"),
])
def test_a_stage_checkpoint_without_its_fields_is_named_by_fuse_before_anything_is_written(
        finished_run, tmp_path, capsys, breakage, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stage = run / "denoiserep-label-free"
    payload = torch.load(stage / "checkpoint.pt", weights_only=True)
    if breakage == "no_model":
        del payload["model"]
    elif breakage == "no_epoch":
        del payload["epoch"]
    elif breakage == "string_conversion":
        payload["conversion"] = "garbage"
    elif breakage == "wrong_plan":
        payload["conversion"]["plan"][0] = {"name": 3, "timestep": "x"}
    else:
        payload = [payload]
    torch.save(payload, stage / "checkpoint.pt")
    assert main(["fuse", str(stage), "--output", str(tmp_path / "fused.safetensors")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and str(stage / "checkpoint.pt") in err
    assert not (tmp_path / "fused.safetensors").exists()
    (stage / "result.json").unlink()  # --resume reads the same file through the same reader
    assert train(tmp_path, "--stage", "baseline", "denoise", "--label-free", "--resume") == 2
    assert str(stage / "checkpoint.pt") in capsys.readouterr().err


# -- a full disk or a read-only folder (item 13) ---------------------------------------------------


def test_a_full_disk_stops_the_run_with_the_previous_checkpoint_intact_and_says_so(tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the second epoch's checkpoint: half of it fits
            with open(path, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert train(tmp_path, "--stage", "baseline") == 2
    err = capsys.readouterr().err
    checkpoint = tmp_path / "run" / "baseline" / "checkpoint.pt"
    assert "No space left on device" in err and f"{checkpoint} is unchanged (the previous version stays intact)" in err
    monkeypatch.undo()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("error", ["safetensors", "permission"])
def test_fuse_into_an_unwritable_place_keeps_the_previous_weights_and_says_so(finished_run, tmp_path, capsys,
                                                                             monkeypatch, error):
    from safetensors import SafetensorError

    output = tmp_path / "fused.safetensors"
    output.write_bytes(b"previous weights")
    stage = finished_run / "denoiserep-label-free"

    def fail(*args, **kwargs):
        if error == "safetensors":
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("denoiserep.checkpoint." + ("save_file" if error == "safetensors" else "tempfile.mkstemp"),
                        fail)
    assert main(["fuse", str(stage), "--output", str(output)]) == 2
    assert "the previous version stays intact" in capsys.readouterr().err
    assert output.read_bytes() == b"previous weights"


# -- nonsense values (items 9, 13, 14) -------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"ema_decay": 5.0}, r"--ema \(ema_decay\) must be in \(0, 1\), got 5.0"),
    ({"grad_clip": -1.0}, r"--grad-clip \(grad_clip\) must be in \(0, inf\)"),
    ({"weight_decay": -0.1}, r"--weight-decay"),
    ({"label_smoothing": 5.0}, r"--label-smoothing \(label_smoothing\) must be in \[0, 1\)"),
    ({"warmup_epochs": -1}, r"--warmup-epochs"),
    ({"mixup": -0.5}, r"--mixup"),
    ({"cutmix": -0.5}, r"--cutmix"),
    ({"lr": float("nan")}, r"--lr \(lr\) must be in \(0, inf\), got nan"),
    ({"extra_lr": -1e-3}, r"--extra-lr"),
    ({"denoise": {"rank": -3}}, r"rank must be an integer >= 1"),
    ({"denoise": {"beta_end": 2.0}}, r"every beta must lie in \(0, 1\)"),
])
def test_nonsense_values_are_refused_with_the_flag_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_the_cli_refuses_nonsense_values_and_missing_cuda_with_exit_code_2(tmp_path, capsys):
    assert train(tmp_path, "--label-smoothing", "5") == 2
    assert "--label-smoothing" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train(tmp_path, "--device", "cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--target-modules", "no_such_layer"], "no layer"),
    (["--timestep-range", "1", "1000"], None),  # a valid setting: the check passes and trains
])
def test_settings_only_a_model_can_check_fail_before_the_baseline_trains(tmp_path, capsys, args, message):
    if message is None:
        assert train(tmp_path, "--stage", "baseline", "denoise", "--label-free", "--extra-epochs", "0", *args) == 0
        return
    assert train(tmp_path, "--stage", "baseline", "denoise", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fewer_timesteps_than_layers_fail_before_the_baseline_trains(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("denoise: {num_timesteps: 2}\n")
    assert train(tmp_path, "--config", str(config), "--stage", "baseline", "denoise") == 2
    assert "raise num_timesteps or set timestep_range" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- every folder a run writes is locked (item 11) -------------------------------------------------


def test_a_multi_seed_run_and_a_run_of_one_of_its_seed_folders_cannot_run_at_once(tmp_path, capsys):
    from denoiserep.train.rundir import run_locks

    with run_lock(tmp_path / "ms" / "seed1"):  # `--name ms/seed1` is running
        assert train(tmp_path, "--stage", "baseline", "--seeds", "0", "1", name="ms") == 2
    assert "in use by another denoiserep run" in capsys.readouterr().err
    assert not (tmp_path / "ms" / "seed0" / "baseline").exists()
    with run_locks(TrainConfig(output=str(tmp_path), name="ms"), [0, 1]):  # `--seeds 0 1 --name ms` is running
        assert train(tmp_path, "--stage", "baseline", name="ms/seed1") == 2
    assert "in use by another denoiserep run" in capsys.readouterr().err
    assert not (tmp_path / "ms" / "seed1" / "baseline").exists()
