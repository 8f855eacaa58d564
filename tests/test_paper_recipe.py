"""`--recipe paper` (the authors' released protocol) and its matched control: the preset's fields, the
authors' timesteps, what each alternating phase may change, the control's schedule, and a test split
that checkpoint selection never reads."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from denoiserep import DenoiseConfig, convert
from denoiserep.cli import main
from denoiserep.convert import authors_code_timesteps, conversion_state, denoiser_parameters, unwrap
from denoiserep.models import create_model
from denoiserep.tasks import create_task
from denoiserep.tasks.classification import ClassificationTask
from denoiserep.tasks.reid import ReidTask
from denoiserep.train import stages
from denoiserep.train.config import TrainConfig
from denoiserep.train.distributed import DistInfo
from denoiserep.train.pipeline import PAPER_VARIANT, run_pipeline, variant_specs
from denoiserep.train.recipes import MLP_LINEARS, RECIPES
from denoiserep.train.stages import StageSpec

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
CPU = torch.device("cpu")


# -- the preset ----------------------------------------------------------------------------------


def test_the_paper_preset_resolves_to_the_authors_protocol():
    cfg = TrainConfig.from_dict({"recipe": "paper"})
    assert (cfg.alternate_every, cfg.noise_weight, cfg.lam, cfg.denoise_init) == (10, 0.1, None, "identity")
    assert (cfg.extra_epochs, cfg.extra_warmup_epochs, cfg.select, cfg.test_fraction) == (40, 3, "best", 0.5)
    assert cfg.denoise_config().loss == "l1+l2" and cfg.denoise_config().timestep_mapping == "execution"
    assert [spec.stage for spec in variant_specs(["all"], cfg)] == ["baseline", "matched-control", "denoise"]
    assert variant_specs(["denoise"], cfg) == [StageSpec("denoise", PAPER_VARIANT, noise_weight=0.1)]
    # Every field stays overridable, and the resolved config reloads to itself (config.yaml, --resume).
    custom = TrainConfig.from_dict({"recipe": "paper", "alternate_every": 3, "denoise": {"loss": "l1"},
                                    "select": "last", "test_fraction": 0.0})
    assert (custom.alternate_every, custom.denoise_config().loss, custom.select, custom.test_fraction) == \
        (3, "l1", "last", 0.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert set(RECIPES) == {"paper"}


def test_lambda_and_noise_weight_are_two_forms_of_the_loss_and_never_both():
    with_lambda = TrainConfig.from_dict({"recipe": "paper", "lam": 0.3})
    assert with_lambda.noise_weight is None and with_lambda.effective_lambda == 0.3
    for given in ({"lam": 0.3, "noise_weight": 0.1}, {"label_free": True, "noise_weight": 0.1}):
        with pytest.raises(ValueError, match=r"--noise-weight \(0.1\) and --(lambda|label-free) are two forms"):
            TrainConfig.from_dict(given)
    assert TrainConfig().effective_lambda == 0.5
    with pytest.raises(ValueError, match="--alternate-every 5 trains the backbone.*--label-free"):
        TrainConfig(label_free=True, alternate_every=5)
    with pytest.raises(ValueError, match="unknown --recipe 'slides'; choose one of paper"):
        TrainConfig.from_dict({"recipe": "slides"})
    with pytest.raises(ValueError, match="--baseline-patience .* needs --select best"):
        TrainConfig(baseline_patience=5)


def test_the_recipe_converts_the_mlp_linears_of_vits_and_every_layer_of_cnns():
    cfg = TrainConfig.from_dict({"recipe": "paper"})
    vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10, **TINY_VIT)
    _, state = convert(vit, cfg.denoise_config(vit), example_inputs=torch.randn(2, 1, 8, 8), return_report=True)
    assert [p.name for p in state.plan] == [f"blocks.{b}.mlp.{fc}" for b in range(2) for fc in ("fc1", "fc2")]
    cnn = create_model("mnist1d_cnn", num_classes=10)
    _, state = convert(cnn, cfg.denoise_config(cnn), example_inputs=torch.randn(2, 1, 40), return_report=True)
    every_layer = convert(create_model("mnist1d_cnn", num_classes=10), DenoiseConfig(),
                          example_inputs=torch.randn(2, 1, 40), return_report=True)[1]
    assert [p.name for p in state.plan] == [p.name for p in every_layer.plan] and len(state.plan) > 1
    # The authors convert direct Linear children of *mlp* modules (Swin's cpb_mlp too), nothing deeper.
    import re

    matches = [name for name in ("blocks.0.mlp.fc1", "layers.1.blocks.0.attn.cpb_mlp.0", "stages.0.MLP.fc2",
                                 "blocks.0.attn.qkv", "blocks.0.mlp.inner.fc", "mlp_head") if re.fullmatch(MLP_LINEARS, name)]
    assert matches == ["blocks.0.mlp.fc1", "layers.1.blocks.0.attn.cpb_mlp.0", "stages.0.MLP.fc2"]
    # A selection given explicitly wins over the recipe's.
    explicit = TrainConfig.from_dict({"recipe": "paper", "denoise": {"target_modules": ["qkv"]}})
    assert explicit.denoise_config(vit).target_modules == ["qkv"]


def test_the_authors_timesteps_repeat_their_recursion_that_loses_the_counter():
    model = nn.Sequential()
    model.a = nn.Linear(4, 4)
    model.inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.d = nn.Linear(4, 4)
    # N = 4: `a` takes 4 and the top frame's counter drops to 3; `inner` recurses with 3 (3, 2) and
    # loses its decrements, so `d` gets 3 again.
    assert authors_code_timesteps(model, ["a", "inner.0", "inner.1", "d"]) == {"a": 4, "inner.0": 3, "inner.1": 2,
                                                                                 "d": 3}
    vit = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=3,
                            embed_dim=32, num_heads=2)
    cfg = TrainConfig.from_dict({"recipe": "paper", "denoise": {"timestep_mapping": "authors-code"}})
    convert(vit, cfg.denoise_config(vit), example_inputs=torch.randn(2, 1, 8, 8))
    plan = {p.name: p.timestep for p in conversion_state(vit).plan}
    assert plan == {f"blocks.{b}.mlp.{fc}": t for b in range(3) for fc, t in (("fc1", 6), ("fc2", 5))}
    with pytest.raises(ValueError, match="authors-code.*timestep_range"):
        DenoiseConfig(timestep_mapping="authors-code", timestep_range=(1, 100))


# -- alternating phases, bit for bit ------------------------------------------------------------


class TinyMlp(nn.Module):
    """A ViT block's MLP in miniature, with a BatchNorm whose running statistics are backbone state."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.norm, self.mlp.act, self.mlp.fc2 = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.GELU(), \
            nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x.flatten(1)))


class TinyMlpTask(ClassificationTask):
    def build_model(self) -> nn.Module:
        return TinyMlp()


def paper_config(tmp_path, **fields) -> TrainConfig:
    values = {"recipe": "paper", "data": "digits", "epochs": 1, "extra_epochs": 4, "alternate_every": 1,
              "extra_warmup_epochs": 1, "warmup_epochs": 0, "batch_size": 128, "output": str(tmp_path), **fields}
    return TrainConfig.from_dict(values)


def is_denoiser_state(key: str) -> bool:
    return ".parametrizations.weight.0." in key


@pytest.mark.parametrize("loss", [{"noise_weight": 0.1}, {"lam": 0.5}], ids=["noise-weight", "lambda"])
def test_a_backbone_phase_changes_only_the_backbone_and_a_denoiser_phase_only_the_denoisers(tmp_path, monkeypatch,
                                                                                             loss):
    cfg = paper_config(tmp_path, extra_epochs=3, **({"noise_weight": None, **loss} if "lam" in loss else loss))
    task = TinyMlpTask(cfg)
    run_pipeline(cfg, task, [StageSpec("baseline", "baseline")], [0], DistInfo(), CPU, latency_repeats=1)
    changed: dict[int, set[str]] = {}
    train_one_epoch = stages.train_one_epoch

    def recording(model, *args, epoch, **kwargs):
        before = {k: v.clone() for k, v in unwrap(model).state_dict().items()}
        out = train_one_epoch(model, *args, epoch=epoch, **kwargs)
        changed[epoch] = {k for k, v in unwrap(model).state_dict().items() if not torch.equal(v, before[k])}
        return out

    monkeypatch.setattr(stages, "train_one_epoch", recording)
    spec = StageSpec("denoise", "paper", **({"lam": loss["lam"]} if "lam" in loss else loss))
    run_pipeline(cfg, task, [spec], [0], DistInfo(), CPU, latency_repeats=1)
    for epoch in (0, 2):  # denoisers first, as the authors' code
        assert changed[epoch] and all(is_denoiser_state(k) for k in changed[epoch]), changed[epoch]
        assert any(k.endswith(".0.A") for k in changed[epoch])
    backbone = changed[1]
    assert backbone and not any(is_denoiser_state(k) for k in backbone), backbone
    assert {"mlp.fc1.parametrizations.weight.original", "mlp.norm.running_mean", "head.weight"} <= backbone


def test_a_denoiser_phase_of_the_noise_weight_form_trains_on_the_weighted_noise_loss_alone(tmp_path):
    cfg = paper_config(tmp_path, extra_epochs=2)
    task = TinyMlpTask(cfg)
    results = run_pipeline(cfg, task, [StageSpec("baseline", "baseline"),
                                       StageSpec("denoise", "paper", noise_weight=0.1)], [0], DistInfo(), CPU,
                           latency_repeats=1).results[0]
    denoisers, backbone = results["paper"].history
    assert (denoisers["phase"], backbone["phase"]) == ("denoisers", "backbone")
    # The task loss never reaches the denoisers (the authors' form): not even computed in their phase.
    assert denoisers["task_loss"] == 0.0 and denoisers["loss"] == pytest.approx(0.1 * denoisers["denoise_loss"])
    assert backbone["loss"] == backbone["task_loss"] > 0 and backbone["denoise_loss"] == 0.0


# -- the matched control ---------------------------------------------------------------------------


def test_the_matched_control_trains_its_backbone_on_the_recipes_schedule(tmp_path, monkeypatch):
    cfg = paper_config(tmp_path, extra_epochs=5, ema_decay=0.9)
    task = TinyMlpTask(cfg)
    run_pipeline(cfg, task, [StageSpec("baseline", "baseline")], [0], DistInfo(), CPU, latency_repeats=1)
    steps: dict[str, list[tuple]] = {}
    epoch_now = {}
    make_optimizer, train_one_epoch = stages._StageRunner._optimizer, stages.train_one_epoch

    def recording_optimizer(runner, model):
        optimizer = make_optimizer(runner, model)
        denoisers = {id(p) for p in denoiser_parameters(model)}
        record = steps.setdefault(runner.spec.variant, [])

        def after_step(opt, args, kwargs):
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            record.append((epoch_now["epoch"], tuple(g["lr"] for g in opt.param_groups if
                                                     not denoisers & {id(p) for p in g["params"]}),
                           any(id(p) not in denoisers for p in params), any(id(p) in denoisers for p in params)))

        optimizer.register_step_post_hook(after_step)
        return optimizer

    def recording_epoch(*args, epoch, **kwargs):
        epoch_now["epoch"] = epoch
        return train_one_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(stages._StageRunner, "_optimizer", recording_optimizer)
    monkeypatch.setattr(stages, "train_one_epoch", recording_epoch)
    specs = [StageSpec("denoise", "paper", noise_weight=0.1), StageSpec("matched-control", "matched-control")]
    results = run_pipeline(cfg, task, specs, [0], DistInfo(), CPU, latency_repeats=1).results[0]

    def backbone_updates(variant):
        return [(epoch, lrs) for epoch, lrs, backbone, _ in steps[variant] if backbone]

    recipe, control = backbone_updates("paper"), backbone_updates("matched-control")
    assert recipe == control and len(recipe) == 2 * len(task.train_loader(DistInfo(), 0, 0))  # epochs 1 and 3
    assert {epoch for epoch, _ in recipe} == {1, 3} and len({lrs for _, lrs in recipe}) > 1  # warm-up, then cosine
    assert all(not denoisers for *_, denoisers in steps["matched-control"])
    assert [r["phase"] for r in results["matched-control"].history] == ["idle", "backbone", "idle", "backbone", "idle"]
    assert [r["lr"] for r in results["matched-control"].history] == [r["lr"] for r in results["paper"].history]
    assert results["matched-control"].extra["backbone_steps"] == results["paper"].extra["backbone_steps"] == len(recipe)


def test_the_matched_control_needs_the_alternating_schedule_it_mirrors(tmp_path):
    cfg = TrainConfig(data="digits", output=str(tmp_path))
    with pytest.raises(ValueError, match="matched-control .* --alternate-every"):
        stages.check_stage_settings([StageSpec("matched-control", "matched-control")], cfg, None, CPU)


# -- selection and the held-out test split ----------------------------------------------------------


class ShiftedTestLabels(ClassificationTask):
    """The digits task with every held-out test label moved to the next class."""

    def __init__(self, cfg):
        super().__init__(cfg)
        indices = self.test.indices
        self.test = torch.utils.data.TensorDataset(torch.stack([self.data.val[i][0] for i in indices]),
                                                   torch.tensor([(self.data.val[i][1] + 1) % 10 for i in indices]))


def untimed(history: list[dict]) -> str:
    """The history without its timings, as text (an idle epoch's losses are NaN, which equals nothing)."""
    return json.dumps([{k: v for k, v in row.items() if k != "samples_per_s"} for row in history])


def test_checkpoint_selection_never_reads_the_test_split(tmp_path):
    runs = {}
    for task_class in (ClassificationTask, ShiftedTestLabels):
        cfg = paper_config(tmp_path / task_class.__name__, epochs=3, model_kwargs=TINY_VIT)
        task = task_class(cfg)
        runs[task_class] = run_pipeline(cfg, task, variant_specs(["all"], cfg), [0], DistInfo(), CPU,
                                        latency_repeats=1).results[0]
    plain, shifted = runs[ClassificationTask], runs[ShiftedTestLabels]
    for variant, result in plain.items():
        history = [row["val_top1"] for row in result.history]
        assert result.extra["selected_epoch"] == history.index(max(history)) + 1
        assert result.metrics["top1"] == max(history)  # the selected weights, evaluated again
        # Another test split changes the test numbers and nothing else: selection never saw it.
        assert untimed(shifted[variant].history) == untimed(result.history)
        assert shifted[variant].metrics == result.metrics
        assert shifted[variant].extra["test_metrics"] != result.extra["test_metrics"]
        assert result.extra["test_metrics"]["samples"] + result.metrics["samples"] == 540


def test_the_demos_data_sets_hold_out_a_fixed_test_split_disjoint_from_validation():
    cfg = TrainConfig(data="digits", test_fraction=0.5)
    digits = create_task(cfg)
    val, test = set(digits.val.indices), set(digits.test.indices)
    assert not val & test and len(val | test) == len(digits.data.val) and abs(len(val) - len(test)) <= 10
    labels = digits.data.val.labels
    for label in range(10):  # stratified by class
        counts = [sum(int(labels[i]) == label for i in part) for part in (val, test)]
        assert abs(counts[0] - counts[1]) <= 1
    assert create_task(cfg).test.indices == digits.test.indices  # depends on no seed
    reid = ReidTask(TrainConfig(task="reid", data="digits-reid", test_fraction=0.5))
    val_ids = set(reid.val.q_pids.tolist()) | set(reid.val.g_pids.tolist())
    test_ids = set(reid.test.q_pids.tolist()) | set(reid.test.g_pids.tolist())
    assert not val_ids & test_ids and len(val_ids) == len(test_ids) == 20
    for task in ("detection", "segmentation"):
        scenes = create_task(TrainConfig(task=task, data="digit-scenes", test_fraction=0.5))
        assert not set(scenes.val.indices) & set(scenes.test.indices)
        assert len(scenes.val) + len(scenes.test) == len(scenes.data.val)
    with pytest.raises(ValueError, match="no 'test' split"):
        create_task(TrainConfig(data="digits")).eval_split("test")


# -- the CLI ----------------------------------------------------------------------------------------


def test_the_paper_demo_reports_the_recipe_beside_its_matched_control_on_the_test_split(tmp_path, capsys):
    assert main(["demo", "--recipe", "paper", "--epochs", "1", "--extra-epochs", "2", "--output", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for variant in ("baseline", "matched-control", PAPER_VARIANT):
        assert f"| {variant} |" in table
    run = tmp_path / "demo-paper"
    result = json.loads((run / PAPER_VARIANT / "result.json").read_text())
    assert result["extra"]["select"] == "best" and "test_metrics" in result["extra"]
    assert "held-out test split" in (run / "report.md").read_text()
    assert main(["evaluate", "--config", str(run / "config.yaml"), "--weights",
                 str(run / PAPER_VARIANT / "model.safetensors"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(result["extra"]["test_metrics"])


def test_the_readme_documents_every_field_of_the_preset_and_what_the_study_found():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    flags = {"denoise": "--loss"}
    for field in RECIPES["paper"]:
        assert f"`{flags.get(field, '--' + field.replace('_', '-'))}`" in readme, field
    for text in ("--recipe paper", "matched control", "--timestep-mapping authors-code", "denoiserep demo --recipe paper",
                 "What the study found", "BENCHMARKS.md §3b"):
        assert text in readme, text
    assert "STUDY_FINDINGS" not in readme
