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

# Flags of `train`/`demo` that map one-to-one onto TrainConfig fields.
_CONFIG_FLAGS: list[tuple[str, str, dict]] = [
    ("--task", "task", {"help": "a task registered in denoiserep.tasks.TASKS"}),
    ("--data", "data", {"help": "digits | mnist1d | imagefolder:PATH | cifar10:PATH | cifar100:PATH | PATH"}),
    ("--extra-data", "extra_data", {"nargs": "+", "help": "unlabeled image folders for the label-free loss"}),
    ("--denoise-data", "denoise_data", {"help": "train the denoisers on this unlabeled image folder (label-free)"}),
    ("--image-size", "image_size", {"type": int}),
    ("--model", "model", {"help": "any timm model name (default: the embedded dataset's model)"}),
    ("--model-kwargs", "model_kwargs", {"type": json.loads, "help": "JSON, e.g. '{\"img_size\": 32}'"}),
    ("--init", "init", {"help": "start the baseline from this checkpoint (.safetensors/.pth)"}),
    ("--convert-scope", "convert_scope", {"help": "what DenoiseRep converts: backbone (default), all, or "
                                                  "(detection) backbone+neck"}),
    ("--crop-size", "crop_size", {"type": int, "help": "segmentation: training crop / sliding window size"}),
    ("--slide-stride", "slide_stride", {"type": int, "help": "segmentation: sliding-window evaluation stride"}),
    ("--epochs", "epochs", {"type": int, "help": "baseline epochs (0 with --init: evaluate only)"}),
    ("--extra-epochs", "extra_epochs", {"type": int, "help": "epochs of control / denoise / head"}),
    ("--batch-size", "batch_size", {"type": int, "help": "global batch (split across processes)"}),
    ("--eval-batch-size", "eval_batch_size", {"type": int}),
    ("--opt", "opt", {"help": "timm optimizer name"}),
    ("--lr", "lr", {"type": float}),
    ("--extra-lr", "extra_lr", {"type": float}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--sched", "sched", {"help": "timm scheduler name"}),
    ("--sched-decay-rate", "sched_decay_rate", {"type": float, "help": "the power of poly, the factor of step"}),
    ("--warmup-epochs", "warmup_epochs", {"type": int}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--mixup", "mixup", {"type": float}),
    ("--cutmix", "cutmix", {"type": float}),
    ("--grad-clip", "grad_clip", {"type": float}),
    ("--amp", "amp", {"choices": ["none", "bf16"]}),
    ("--ema", "ema_decay", {"type": float, "help": "EMA decay, e.g. 0.999"}),
    ("--lambda", "lam", {"type": float, "help": "Loss = (1 − λ)·task + λ·denoise"}),
    ("--alternate-every", "alternate_every", {"type": int, "help": "authors' option: swap denoisers/backbone every K epochs"}),
    ("--denoise-init", "denoise_init", {"choices": ["calibrate", "identity"],
                                         "help": "start the denoisers at their closed-form optimum (default) or at identity"}),
    ("--calibrate-batches", "calibrate_batches", {"type": int, "help": "training batches the calibration sees"}),
    ("--calibrate-passes", "calibrate_passes", {"type": int, "help": "calibration passes: each later one refits "
                                                "every layer to the inputs the calibrated layers before it produce"}),
    ("--head-steps", "head_steps", {"type": int, "help": "DenoiseRep⁻ reverse steps"}),
    ("--device", "device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads (default: 1 below 5M parameters, else torch's)"}),
    ("--skip-bad-images", "skip_bad_images", {"action": "store_true",
                                              "help": "replace unreadable training images (counted, logged) instead of stopping"}),
    ("--workers", "workers", {"type": int}),
    ("--output", "output", {}),
    ("--name", "name", {}),
]
# DenoiseConfig fields settable from the command line (stored under TrainConfig.denoise).
_DENOISE_FLAGS: list[tuple[str, str, dict]] = [
    ("--schedule", "schedule", {"choices": ["linear", "ddpm", "cosine"]}),
    ("--timestep-range", "timestep_range", {"type": int, "nargs": 2, "metavar": ("LO", "HI")}),
    ("--denoiser", "denoiser", {"choices": ["full", "low_rank"]}),
    ("--rank", "rank", {"type": int}),
    ("--loss", "loss", {"choices": ["l1", "l2", "l1+l2"]}),
    ("--loss-token-fraction", "loss_token_fraction", {"type": float}),
    ("--loss-estimator", "loss_estimator", {"choices": ["expected", "sampled"]}),
    ("--training-path", "training_path", {"choices": ["auto", "weight", "input"]}),
    ("--target-modules", "target_modules", {"nargs": "+"}),
    ("--exclude-modules", "exclude_modules", {"nargs": "+"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoiserep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run pipeline stages (torchrun-compatible)")
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    train.add_argument("--stage", nargs="+", default=["all"],
                       help="baseline | control | denoise | head | all (default: all)")
    _add_config_flags(train)
    train.add_argument("--label-free", action="store_true", default=None, help="λ = 1: no labels at all")
    train.add_argument("--seeds", type=int, nargs="+", help="repeat the run per seed: mean ± std and paired Δ")
    train.add_argument("--resume", action="store_true", help="continue unfinished stages, reuse finished ones")

    demo = sub.add_parser("demo", help="the whole pipeline on embedded data, no download (≤ 5 min on 2 cores)")
    demo.add_argument("--task", choices=list(TASKS), default="classification")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0])
    demo.add_argument("--epochs", type=int)
    demo.add_argument("--extra-epochs", type=int)
    demo.add_argument("--output", default="runs")
    demo.add_argument("--name")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for a model this small)")
    demo.add_argument("--fresh", action="store_true",
                      help="delete the demo's earlier run and start over (by default finished stages are reused "
                           "and an interrupted one continues)")

    fuse_cmd = sub.add_parser("fuse", help="fuse a denoise stage's checkpoint into plain safetensors weights")
    fuse_cmd.add_argument("stage_dir", type=Path, help="e.g. runs/NAME/denoiserep-label-aug")
    fuse_cmd.add_argument("--output", type=Path, help="default: STAGE_DIR/model.safetensors")

    evaluate = sub.add_parser("evaluate", help="evaluate weights on a run's validation data")
    evaluate.add_argument("--config", type=Path, required=True, help="the run's config.yaml")
    evaluate.add_argument("--weights", type=Path, required=True, help="a .safetensors file from a run")

    # Listed for the usage text only: `main` hands `bench …` to denoiserep.bench's own parser.
    sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md; denoiserep bench --help)")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for flag, dest, kwargs in _CONFIG_FLAGS + _DENOISE_FLAGS:
        if dest == "task":
            kwargs = {**kwargs, "choices": list(TASKS)}  # the registry as it is when the parser is built
        parser.add_argument(flag, dest=dest, default=None, **kwargs)


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
    task = task_class(args.task)
    values = {"task": args.task, **task.demo_defaults, "output": args.output}
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

    specs = variant_specs(stages, cfg.lam)
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
            print(f"{variant}: {stage_result.metrics} -> {run_dir / stage_result.weights}")
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
    print(f"fused {len(report.layers)} layers (epoch {payload['epoch']}) -> {output}; fused == unfused on "
          f"{len(batch)} validation inputs (max relative error {report.max_relative_error:.1e})")
    if report.added_biases:
        print(f"layers that gained a bias: {', '.join(report.added_biases)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tasks import create_task
    from .train.distributed import init_distributed
    from .train.outputs import load_stage_weights

    cfg = TrainConfig.from_yaml(args.config)
    info, device = init_distributed(cfg.device)
    task = create_task(cfg)
    model = load_stage_weights(task, cfg, args.weights, device)
    print(json.dumps(task.evaluate(model, info, device), indent=2))
    return 0


_COMMANDS = {"train": cmd_train, "demo": cmd_demo, "fuse": cmd_fuse, "evaluate": cmd_evaluate}

if __name__ == "__main__":
    sys.exit(main())
