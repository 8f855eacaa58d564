"""The command line a new user meets: help texts, pretrained starts, refusals, the table after any stage,
epoch numbering, plots, TensorBoard."""

import json
import re

import pytest
import torch

from denoiserep.cli import _CONFIG_FLAGS, _DENOISE_FLAGS, build_parser, main
from denoiserep.tasks import TASKS, task_class

FAST = ["--data", "digits", "--epochs", "1", "--extra-epochs", "1", "--batch-size", "64",
        "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']


def train(tmp_path, *args, name="run"):
    return main(["train", *args, "--output", str(tmp_path), "--name", name])


def help_text(*command) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    return sub[command[0]].format_help()


# -- help --------------------------------------------------------------------------------------------------

def test_every_train_flag_has_help_and_shows_its_default():
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    entries = {}  # each option's help, by its first flag
    for block in re.split(r"\n(?=  -)", help_text("train").split("options:")[1].strip("\n")):
        entries[block.split()[0].rstrip(",")] = re.sub(r"\s+", " ", block)
    for flag, default in (("--epochs", "30"), ("--lr", "0.002"), ("--lambda", "0.5"), ("--schedule", "linear"),
                          ("--calibrate-batches", "100"), ("--keep-state-dict-keys", "on"), ("--stage", "all")):
        assert f"(default: {default})" in entries[flag], (flag, entries[flag])
    assert len(_CONFIG_FLAGS) + len(_DENOISE_FLAGS) > 40


def test_data_help_lists_every_tasks_sources():
    text = re.sub(r"\s+", " ", help_text("train"))
    for name in TASKS:
        sources = task_class(name).data_sources
        assert sources and f"{name}: {sources}" in text


def test_demo_help_describes_each_option():
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    assert all(action.help for action in parser._actions if action.option_strings)
    assert "Every stage" in parser.format_help()


# -- starting points ---------------------------------------------------------------------------------------

def test_epochs_0_without_a_trained_start_is_refused(tmp_path, capsys):
    assert train(tmp_path, *FAST, "--epochs", "0", "--stage", "baseline") == 2
    assert "--epochs 0 trains no baseline" in capsys.readouterr().err
    assert not list(tmp_path.rglob("result.json"))


def ten_class_digits_vit(num_classes):
    from denoiserep.models import create_model

    return create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1,
                        num_heads=2, num_classes=num_classes)


def test_init_with_another_class_count_and_reset_classifier_trains_a_new_head(tmp_path, capsys):
    pretrained = ten_class_digits_vit(1000)
    torch.save(pretrained.state_dict(), tmp_path / "in1k.pth")
    assert train(tmp_path, *FAST, "--init", str(tmp_path / "in1k.pth"), "--stage", "baseline") == 2
    assert "--reset-classifier" in capsys.readouterr().err
    assert train(tmp_path, *FAST, "--init", str(tmp_path / "in1k.pth"), "--reset-classifier", "--epochs", "0",
                 "--stage", "baseline", name="zero") == 2
    assert "must be trained" in capsys.readouterr().err
    assert train(tmp_path, *FAST, "--init", str(tmp_path / "in1k.pth"), "--reset-classifier", "--stage",
                 "baseline") == 0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "baseline" / "model.safetensors")
    assert weights["head.weight"].shape[0] == 10
    # The backbone started from the file: one epoch moves it only a little from there.
    start = pretrained.state_dict()["blocks.0.mlp.fc1.weight"]
    assert (weights["blocks.0.mlp.fc1.weight"] - start).norm() < 0.5 * start.norm()


def test_a_pretrained_start_the_timm_way_from_a_local_file(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(ten_class_digits_vit(1000).state_dict(), tmp_path / "in1k.safetensors")
    kwargs = {"embed_dim": 32, "depth": 1, "num_heads": 2, "pretrained": True,
              "pretrained_cfg_overlay": {"file": str(tmp_path / "in1k.safetensors")}}
    args = ["--data", "digits", "--epochs", "1", "--batch-size", "64", "--model-kwargs", json.dumps(kwargs),
            "--stage", "baseline"]
    assert train(tmp_path, *args) == 0
    missing = {**kwargs, "pretrained_cfg_overlay": {"file": str(tmp_path / "nope.safetensors")}}
    assert train(tmp_path, *args[:-4], "--model-kwargs", json.dumps(missing), "--stage", "baseline",
                 name="missing") == 2
    assert "does not exist" in capsys.readouterr().err
    no_file = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    assert train(tmp_path, *args[:-4], "--model-kwargs", json.dumps(no_file), "--stage", "baseline",
                 name="nofile") == 2
    assert "nothing is downloaded" in capsys.readouterr().err


# -- reports ------------------------------------------------------------------------------------------------

def test_any_stage_run_reports_everything_the_run_folder_holds(tmp_path, capsys):
    assert train(tmp_path, *FAST, "--stage", "baseline") == 0
    capsys.readouterr()
    assert train(tmp_path, *FAST, "--stage", "control", "denoise") == 0
    table = capsys.readouterr().out
    assert all(f"| {variant} |" in table for variant in ("baseline", "control", "denoiserep"))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| control |" in report and "| denoiserep |" in report


def test_epochs_are_numbered_from_1_in_the_bar_the_log_and_log_csv(tmp_path, capsys, monkeypatch):
    import denoiserep.train.engine as engine

    bars = []
    real_tqdm = engine.tqdm
    monkeypatch.setattr(engine, "tqdm", lambda *a, **k: bars.append(k["desc"]) or real_tqdm(*a, **k))
    assert train(tmp_path, *FAST, "--epochs", "2", "--stage", "baseline") == 0
    assert bars == ["baseline epoch 1", "baseline epoch 2"]
    log = capsys.readouterr().err
    assert "baseline epoch 1/2" in log and "baseline epoch 2/2" in log
    rows = (tmp_path / "run" / "baseline" / "log.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2"]


def test_loss_curves_put_task_and_noise_losses_on_separate_axes_with_markers():
    from denoiserep.report import loss_curves

    histories = {"baseline": [{"epoch": 1, "task_loss": 2.0, "denoise_loss": 0.0}],
                 "denoiserep-label-free": [{"epoch": 1, "task_loss": 0.0, "denoise_loss": 13.5}],
                 "denoiserep-label-aug": [{"epoch": 1, "task_loss": 1.9, "denoise_loss": 12.1},
                                          {"epoch": 2, "task_loss": 1.8, "denoise_loss": 11.7}]}
    task_axis, noise_axis = loss_curves(histories).axes
    assert [line.get_label() for line in task_axis.lines] == ["baseline", "denoiserep-label-aug"]
    assert [line.get_label() for line in noise_axis.lines] == ["denoiserep-label-free", "denoiserep-label-aug"]
    assert all(line.get_marker() == "o" for line in task_axis.lines + noise_axis.lines)  # one point stays visible


def test_tensorboard_scalars_are_written_when_tensorboard_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tmp_path, *FAST, "--stage", "baseline") == 0
    events = EventAccumulator(str(tmp_path / "run" / "baseline" / "tensorboard")).Reload()
    assert {"loss", "val_top1", "lr"} <= set(events.Tags()["scalars"])
