"""`denoiserep` command line: demo, train, fuse, evaluate, bench.

Every flag of `train` overrides the same field of ``--config FILE.yaml`` (TrainConfig).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from .tasks import TASKS, task_class
from .train.config import TrainConfig


def _passes(value: str) -> int | str:
    """``--calibrate-passes``: 'auto' or a number of passes."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {value!r}") from None


# Flags of `train` that map one-to-one onto TrainConfig fields; --help adds each field's default.
_CONFIG_FLAGS: list[tuple[str, str, dict]] = [
    ("--task", "task", {"help": "the kind of problem (a task registered in denoiserep.tasks.TASKS)"}),
    ("--data", "data", {"help": "the data set; per task: {data_sources}"}),
    ("--extra-data", "extra_data", {"nargs": "+", "metavar": "DIR",
                                    "help": "unlabeled image folders whose noise loss is added (label-free loss on "
                                            "merged datasets)"}),
    ("--denoise-data", "denoise_data", {"metavar": "DIR",
                                        "help": "train the denoisers on this unlabeled image folder (label-free)"}),
    ("--image-size", "image_size", {"type": int, "help": "resize images to this size (default: per data set)"}),
    ("--model", "model", {"help": "a timm model name, or the task's models (see README; default: the embedded "
                                  "data set's model)"}),
    ("--model-kwargs", "model_kwargs", {"type": json.loads, "metavar": "JSON",
                                        "help": "keyword arguments of the model, e.g. '{\"img_size\": 32}'; a pretrained "
                                                "start the timm way: '{\"pretrained\": true, \"pretrained_cfg_overlay\": "
                                                "{\"file\": \"/w/resnet50.safetensors\"}}' (a classifier of another class "
                                                "count is re-initialised)"}),
    ("--init", "init", {"metavar": "FILE", "help": "start the baseline from this checkpoint (.safetensors / .pth "
                                                   "state_dict); with --epochs 0 it is the baseline"}),
    ("--convert-scope", "convert_scope", {"help": "what DenoiseRep converts: backbone, all, or (detection) "
                                                  "backbone+neck"}),
    ("--crop-size", "crop_size", {"type": int, "help": "segmentation: training crop / sliding window size "
                                                       "(default: per data set)"}),
    ("--slide-stride", "slide_stride", {"type": int, "help": "segmentation: sliding-window evaluation stride "
                                                             "(default: whole images)"}),
    ("--epochs", "epochs", {"type": int, "help": "baseline training epochs (0 needs --init or a pretrained model: "
                                                 "the baseline is then evaluated, not trained)"}),
    ("--extra-epochs", "extra_epochs", {"type": int, "help": "epochs of each control / denoise / head stage"}),
    ("--batch-size", "batch_size", {"type": int, "help": "global training batch (split across processes)"}),
    ("--eval-batch-size", "eval_batch_size", {"type": int, "help": "evaluation batch"}),
    ("--opt", "opt", {"help": "optimizer (a timm optimizer name: adamw, sgd, momentum, …)"}),
    ("--lr", "lr", {"type": float, "help": "baseline learning rate"}),
    ("--extra-lr", "extra_lr", {"type": float, "help": "learning rate of the control / denoise / head stages"}),
    ("--extra-warmup-epochs", "extra_warmup_epochs", {"type": int, "help": "warm-up epochs of the extra stages' "
                                                                          "restarted learning-rate schedule"}),
    ("--weight-decay", "weight_decay", {"type": float, "help": "weight decay of the baseline and control "
                                                               "(denoisers train without)"}),
    ("--sched", "sched", {"help": "learning-rate schedule (a timm scheduler name: cosine, poly, step, …)"}),
    ("--sched-decay-rate", "sched_decay_rate", {"type": float, "help": "the power of poly, the factor of step"}),
    ("--warmup-epochs", "warmup_epochs", {"type": int, "help": "baseline warm-up epochs"}),
    ("--label-smoothing", "label_smoothing", {"type": float, "help": "label smoothing of the cross-entropy"}),
    ("--mixup", "mixup", {"type": float, "help": "mixup alpha (0: off)"}),
    ("--cutmix", "cutmix", {"type": float, "help": "cutmix alpha (0: off)"}),
    ("--grad-clip", "grad_clip", {"type": float, "help": "clip the gradient norm to this value (default: no clipping)"}),
    ("--amp", "amp", {"choices": ["none", "bf16"], "help": "mixed precision"}),
    ("--ema", "ema_decay", {"type": float, "help": "EMA of the weights with this decay, e.g. 0.999 (default: none)"}),
    ("--lambda", "lam", {"type": float, "help": "Loss = (1 − λ)·task + λ·noise loss of the denoise stage "
                                                 "(default: 0.5)"}),
    ("--noise-weight", "noise_weight", {"type": float, "metavar": "W",
                                        "help": "Loss = task + W·noise loss, as the authors' code adds it: the task "
                                                "loss trains the backbone, the noise loss the denoisers (excludes "
                                                "--lambda)"}),
    ("--alternate-every", "alternate_every", {"type": int, "metavar": "K",
                                              "help": "the authors' option: every K epochs swap between training the "
                                                      "denoisers (backbone frozen) and the backbone on the task loss "
                                                      "through W′ (denoisers frozen); default: denoisers only"}),
    ("--recipe", "recipe", {"choices": ["paper"],
                            "help": "a preset of these flags; 'paper': the authors' released protocol (README, "
                                    "denoiserep.train.recipes); flags given explicitly override it"}),
    ("--select", "select", {"choices": ["last", "best"],
                            "help": "the epoch a stage keeps: the last, or the best on the validation split"}),
    ("--baseline-patience", "baseline_patience", {"type": int, "metavar": "EPOCHS",
                                                  "help": "stop the baseline when its validation metric has not "
                                                          "improved for this many epochs (needs --select best)"}),
    ("--test-fraction", "test_fraction", {"type": float, "metavar": "F",
                                          "help": "hold out this fraction of the validation split as a test split "
                                                  "that only the final number reads"}),
    ("--denoise-init", "denoise_init", {"choices": ["calibrate", "identity"],
                                         "help": "start the denoisers at their closed-form optimum or at identity "
                                                 "(the paper's start)"}),
    ("--calibrate-batches", "calibrate_batches", {"type": int, "help": "training batches the calibration sees "
                                                                       "(at most)"}),
    ("--calibrate-passes", "calibrate_passes", {"type": _passes, "help": "calibration passes: each later one refits "
                                                "every layer to the inputs the calibrated layers before it produce; "
                                                "'auto' refits while a layer would end above its starting loss"}),
    ("--head-steps", "head_steps", {"type": int, "help": "DenoiseRep⁻ reverse steps"}),
    ("--device", "device", {"choices": ["auto", "cpu", "cuda"], "help": "auto: CUDA when available"}),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads (default: 1 below 5M parameters, else torch's)"}),
    ("--compile", "compile", {"action": "store_true",
                              "help": "torch.compile the training step (CUDA graphs on a GPU); the same step, "
                                      "fewer kernel launches, after a compilation in the first steps"}),
    ("--skip-bad-images", "skip_bad_images", {"action": "store_true",
                                              "help": "replace unreadable training images (counted, logged) instead "
                                                      "of stopping"}),
    ("--reset-classifier", "reset_classifier", {"action": "store_true",
                                                "help": "with --init: a checkpoint whose classifier has another "
                                                        "number of classes loads without it, and a new classifier "
                                                        "is trained (needs --epochs > 0)"}),
    ("--workers", "workers", {"type": int, "help": "data loader worker processes"}),
    ("--output", "output", {"metavar": "DIR", "help": "folder of all runs"}),
    ("--name", "name", {"help": "this run's folder under --output"}),
]
# DenoiseConfig fields settable from the command line (stored under TrainConfig.denoise).
_DENOISE_FLAGS: list[tuple[str, str, dict]] = [
    ("--schedule", "schedule", {"choices": ["linear", "ddpm", "cosine"],
                                "help": "noise schedule: linear (the authors' β 1e-4 → 2e-3), ddpm (→ 0.02), cosine"}),
    ("--timestep-range", "timestep_range", {"type": int, "nargs": 2, "metavar": ("LO", "HI"),
                                            "help": "spread the layers' timesteps over [LO, HI] (default: "
                                                    "t_i = N − i + 1)"}),
    ("--timestep-mapping", "timestep_mapping", {"choices": ["execution", "authors-code"],
                                                "help": "execution: by forward order (t_i = N − i + 1); authors-code: "
                                                        "as the authors' released code (N / N − 1 in every block)"}),
    ("--denoiser", "denoiser", {"choices": ["full", "low_rank"], "help": "d × d denoisers, or diagonal + rank r"}),
    ("--rank", "rank", {"type": int, "help": "rank r of the low_rank denoiser"}),
    ("--loss", "loss", {"choices": ["l1", "l2", "l1+l2"], "help": "noise-prediction loss"}),
    ("--loss-token-fraction", "loss_token_fraction", {"type": float,
                                                      "help": "estimate the noise loss on this random fraction of "
                                                              "positions"}),
    ("--loss-estimator", "loss_estimator", {"choices": ["expected", "sampled"],
                                            "help": "one ε per position (the paper), or the exact expectation over ε"}),
    ("--training-path", "training_path", {"choices": ["auto", "weight", "input"],
                                          "help": "how a training step reaches the denoiser (auto: the cheaper)"}),
    ("--target-modules", "target_modules", {"nargs": "+", "metavar": "NAME",
                                            "help": "convert only layers whose names match (PEFT-style suffixes or "
                                                    "globs; default: every Linear / Conv)"}),
    ("--exclude-modules", "exclude_modules", {"nargs": "+", "metavar": "NAME",
                                              "help": "leave out layers whose names match"}),
    ("--keep-state-dict-keys", "keep_state_dict_keys", {"action": argparse.BooleanOptionalAction,
                                                        "help": "skip bias-free layers that no BatchNorm can absorb "
                                                                "(e.g. Swin's downsample.reduction), so that the fused "
                                                                "weights load into the original architecture; --no-… "
                                                                "denoises them too and each gains a bias"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoiserep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = _DefaultsFormatter

    train = sub.add_parser("train", help="run pipeline stages (torchrun-compatible)", formatter_class=formatter,
                           description="Run pipeline stages on your data; every flag overrides the same field of "
                                       "--config. Any run prints the table of every stage the run folder holds and "
                                       "rewrites its report.md.")
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    train.add_argument("--stage", nargs="+", default=["all"],
                       help="baseline | control | matched-control | denoise | head | all (with --recipe paper, all "
                            "is baseline, matched-control and denoise) (default: all)")
    _add_config_flags(train)
    train.add_argument("--label-free", action="store_true", default=None,
                       help="λ = 1: the denoise stage uses no labels at all")
    train.add_argument("--seeds", type=int, nargs="+", help="repeat the run per seed: mean ± std and paired Δ "
                                                            "(default: the config's seed)")
    train.add_argument("--resume", action="store_true", help="continue unfinished stages, reuse finished ones")

    demo = sub.add_parser("demo", help="the whole pipeline on embedded data, no download (≤ 5 min on 2 cores)",
                          formatter_class=formatter,
                          description="Every stage (baseline, control, DenoiseRep⁻, DenoiseRep calibrated / "
                                      "label-free / label-aug) on data that ships with the package, then the table "
                                      "and runs/<name>/report.md. A finished or interrupted demo is continued.")
    demo.add_argument("--task", choices=list(TASKS), default="classification",
                      help="which task's demo (its embedded data and model)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="one run per seed; several give mean ± std and paired Δ with 95%% intervals")
    demo.add_argument("--epochs", type=int, help="baseline epochs (default: the task's demo setting)")
    demo.add_argument("--extra-epochs", type=int, help="epochs of each later stage (default: the task's demo setting)")
    demo.add_argument("--output", default="runs", help="folder of all runs")
    demo.add_argument("--name", help="this demo's folder under --output (default: the task's demo name)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for a model this small)")
    demo.add_argument("--recipe", choices=["paper"],
                      help="the authors' protocol instead (baseline, DenoiseRep by the recipe, its matched control; "
                           "scaled to the demo: see README), in runs/<demo name>-paper")
    demo.add_argument("--fresh", action="store_true",
                      help="delete the demo's earlier run and start over (by default finished stages are reused "
                           "and an interrupted one continues)")

    fuse_cmd = sub.add_parser("fuse", help="fuse a denoise stage's checkpoint into plain safetensors weights",
                              formatter_class=formatter)
    fuse_cmd.add_argument("stage_dir", type=Path, help="e.g. runs/NAME/denoiserep-label-aug")
    fuse_cmd.add_argument("--output", type=Path, help="default: STAGE_DIR/model.safetensors")

    evaluate = sub.add_parser("evaluate", help="evaluate weights on a run's validation data", formatter_class=formatter)
    evaluate.add_argument("--config", type=Path, required=True, help="the run's config.yaml")
    evaluate.add_argument("--weights", type=Path, required=True, help="a .safetensors file from a run")
    evaluate.add_argument("--split", choices=["val", "test"], default="val",
                          help="the validation split, or the held-out test split of a run with --test-fraction")

    # Listed for the usage text only: `main` hands `bench …` to denoiserep.bench's own parser.
    sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md; denoiserep bench --help)")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig / DenoiseConfig flags; their default is None (so that --config values stay), and
    the help shows the field's own default instead."""
    from dataclasses import asdict

    from .config import DenoiseConfig

    defaults = {**asdict(TrainConfig()), **{f"denoise.{k}": v for k, v in asdict(DenoiseConfig()).items()}}
    for flag, dest, kwargs in _CONFIG_FLAGS + _DENOISE_FLAGS:
        kwargs = dict(kwargs)
        if dest == "task":
            kwargs["choices"] = list(TASKS)  # the registry as it is when the parser is built
        if dest == "data":
            kwargs["help"] = kwargs["help"].format(data_sources="; ".join(
                f"{name}: {task_class(name).data_sources}" for name in TASKS))
        default = defaults.get(dest) if any(dest == d for _, d, _ in _CONFIG_FLAGS) else defaults.get(f"denoise.{dest}")
        shown = "" if default in (None, [], {}) or "default:" in kwargs["help"] or kwargs.get("action") == "store_true" \
            else f" (default: {_shown(default)})"
        kwargs["help"] = (kwargs["help"] + shown).replace("%", "%%")
        parser.add_argument(flag, dest=dest, default=None, **kwargs)


class _DefaultsFormatter(argparse.HelpFormatter):
    """argparse's help, plus "(default: …)" for every option whose default is a value (not None / off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default:" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _shown(value) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], type):
        return ", ".join(t.__name__ for t in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {dest: getattr(args, dest) for _, dest, _ in _CONFIG_FLAGS if getattr(args, dest) is not None}
    if getattr(args, "label_free", None):
        overrides["label_free"] = True
    denoise = {dest: getattr(args, dest) for _, dest, _ in _DENOISE_FLAGS if getattr(args, dest) is not None}
    base = TrainConfig.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    if denoise:
        overrides["denoise"] = {**base.get("denoise", {}), **denoise}
    return TrainConfig.from_dict({**base, **overrides})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    verbose = any(arg in ("-v", "--verbose") for arg in argv[:command_at])
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if argv[command_at:command_at + 1] == ["bench"]:
        # The benchmark has its own parser (and --help); its arguments are handed over untouched.
        from .bench import main as bench_main

        return bench_main(argv[command_at + 1:])
    args = build_parser().parse_args(argv)
    from .fuse import FusionError
    from .train.engine import NonFiniteLossError

    try:
        return _COMMANDS[args.command](args)
    # OSError: files that cannot be read or written (FileNotFoundError, FileExistsError, a full disk:
    # `checkpoint.OutputWriteError`, which says that the previous file is intact).
    except (ValueError, OSError, NonFiniteLossError, FusionError) as error:
        print(f"denoiserep {args.command}: error: {error}", file=sys.stderr)
        return 2


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return _run(cfg, args.stage, args.seeds or [cfg.seed], args.resume)


def cmd_demo(args: argparse.Namespace) -> int:
    from .train.recipes import demo_values

    task = task_class(args.task)
    defaults = demo_values(args.recipe, task.demo_defaults) if args.recipe else task.demo_defaults
    values = {"task": args.task, **defaults, "output": args.output}
    for key in ("epochs", "extra_epochs", "name", "threads"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    cfg = TrainConfig.from_dict(values)
    if task.demo_note:
        print(task.demo_note)
    # The main command must work again after an interrupted or finished run: it continues the
    # run in its folder (reusing finished stages) unless --fresh starts over.
    if args.fresh and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
        print(f"--fresh: deleted {cfg.run_dir}; starting over")
    elif cfg.run_dir.exists():
        print(f"{cfg.run_dir} exists: continuing it (finished stages are reused; --fresh starts over)")
    return _run(cfg, ["all"], args.seeds, resume=True)


def _run(cfg: TrainConfig, stages: list[str], seeds: list[int], resume: bool) -> int:
    from .tasks import create_task
    from .train.distributed import init_distributed, shutdown_distributed
    from .train.pipeline import run_pipeline, variant_specs
    from .train.rundir import seed_config

    specs = variant_specs(stages, cfg)
    info, device = init_distributed(cfg.device)
    try:
        task = create_task(cfg)
        model = task.build_model()  # fail on a bad model name or data before writing anything
        set_threads(cfg, model)
        result = run_pipeline(cfg, task, specs, seeds, info, device, resume=resume)
    finally:
        shutdown_distributed()
    if info.is_main:
        if result.table:
            print(result.table)
        if result.report:
            print(f"\nreport: {result.report}")
        run_dir = seed_config(cfg, seeds[0], len(seeds)).run_dir
        for variant, stage_result in result.results[seeds[0]].items():
            test = stage_result.extra.get("test_metrics")
            print(f"{variant}: {stage_result.metrics}{f'; held-out test split: {test}' if test else ''} -> "
                  f"{run_dir / stage_result.weights}")
    return 0


# A model this small gains nothing from a second thread, and with a competing process on a small
# machine the threads' synchronisation turns a 1-minute demo into 20 (measured: BENCHMARKS / README).
SMALL_MODEL_PARAMETERS = 5_000_000


def set_threads(cfg: TrainConfig, model) -> None:
    """torch's CPU threads: ``cfg.threads`` if given; 1 for small models; torch's default otherwise."""
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)


def cmd_fuse(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_state_dict_checked, save_fused
    from .convert import ConversionState, apply_plan
    from .fuse import fuse
    from .tasks import create_task
    from .train.outputs import FUSE_FIELDS, read_checkpoint

    checkpoint = args.stage_dir / "checkpoint.pt"
    config_path = args.stage_dir.parent / "config.yaml"
    if not checkpoint.exists() or not config_path.exists():
        raise FileNotFoundError(
            f"expected {checkpoint} and {config_path} (a denoise stage folder of a run); found neither or one"
        )
    payload = read_checkpoint(checkpoint, needed=FUSE_FIELDS, denoise=True)
    cfg = TrainConfig.from_yaml(config_path)
    task = create_task(cfg)
    model = task.build_model()
    try:
        apply_plan(task.conversion_root(model), ConversionState.from_dict(payload["conversion"]))
    except ValueError as error:
        raise ValueError(f"{checkpoint}: its conversion does not apply to this run's model: {error}") from None
    load_state_dict_checked(model, payload["model"], checkpoint)
    # Checked on real inputs: a wrong fusion must fail here, not in the user's deployment.
    batch = task.example_inputs(torch.device("cpu"), batch=cfg.eval_batch_size)
    _, report = fuse(model.eval(), example_inputs=(batch,), return_report=True)
    output = args.output or args.stage_dir / "model.safetensors"
    save_fused(model, output, metadata={"source": str(checkpoint), "stage": "denoise"},
               added_biases=report.added_biases)
    print(f"epoch {payload['epoch'] + 1} of {checkpoint} -> {output}; fused == unfused on {len(batch)} validation "
          f"inputs (max relative error {report.max_relative_error:.1e})")
    print(report.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tasks import create_task
    from .train.distributed import init_distributed
    from .train.outputs import load_stage_weights

    cfg = TrainConfig.from_yaml(args.config)
    info, device = init_distributed(cfg.device)
    task = create_task(cfg)
    model = load_stage_weights(task, cfg, args.weights, device)
    if args.split == "test" and not getattr(task, "has_test_split", False):
        raise ValueError(f"{args.config} has no held-out test split (test_fraction: {cfg.test_fraction}); evaluate "
                         "--split val, or train with --test-fraction")
    split = {"split": "test"} if args.split == "test" else {}
    print(json.dumps(task.evaluate(model, info, device, **split), indent=2))
    return 0


_COMMANDS = {"train": cmd_train, "demo": cmd_demo, "fuse": cmd_fuse, "evaluate": cmd_evaluate}

if __name__ == "__main__":
    sys.exit(main())
