"""Bad input: one clear paragraph, a non-zero exit code, and nothing that looks like a finished run."""

import pytest
import torch

from denoiserep.cli import main

SMALL = ["--data", "digits", "--epochs", "1", "--extra-epochs", "1",
         "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']


def train(tmp_path, *args):
    return main(["train", *args, "--output", str(tmp_path), "--name", "bad"])


def assert_no_finished_run(tmp_path):
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("report.md"))


@pytest.mark.parametrize("args, message", [
    (["--model", "vit_tiny_patch16_22"], "Did you mean: vit_tiny_patch16_224"),
    (["--data", "imagefolder:/nonexistent/imagenet"], "does not exist"),
    (["--lambda", "1.5"], r"--lambda must be in \[0, 1\]"),
    (["--data", "digits", "--stage", "nonsense"], "unknown stage"),
])
def test_bad_arguments_are_explained(tmp_path, capsys, args, message):
    assert train(tmp_path, *SMALL, *args) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert_no_finished_run(tmp_path)


def test_label_aug_on_unlabeled_data_is_refused(tmp_path, capsys):
    assert train(tmp_path, *SMALL, "--denoise-data", str(tmp_path), "--lambda", "0.5") == 2
    assert "needs labels" in capsys.readouterr().err


def test_an_init_checkpoint_with_another_class_count_is_refused(tmp_path, capsys):
    from denoiserep.models import create_model

    model = create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1,
                         num_heads=2, num_classes=3)
    path = tmp_path / "three_classes.pth"
    torch.save(model.state_dict(), path)
    assert train(tmp_path, *SMALL, "--init", str(path), "--stage", "baseline") == 2
    assert "3-class classifier" in capsys.readouterr().err
    assert_no_finished_run(tmp_path)


def test_an_init_checkpoint_from_another_architecture_is_refused(tmp_path, capsys):
    from denoiserep.models import create_model

    path = tmp_path / "resnet.pth"
    torch.save(create_model("resnet10t", num_classes=10, in_chans=1).state_dict(), path)
    assert train(tmp_path, *SMALL, "--init", str(path), "--stage", "baseline") == 2
    assert "does not match this model's layers" in capsys.readouterr().err


def test_a_nan_loss_stops_the_stage_and_names_it(tmp_path, capsys):
    assert train(tmp_path, *SMALL, "--stage", "baseline", "--lr", "1e30", "--warmup-epochs", "0") == 2
    err = capsys.readouterr().err
    assert "stage 'baseline'" in err and "last good checkpoint" in err
    assert_no_finished_run(tmp_path)
