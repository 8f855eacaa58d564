"""`TrainConfig`: everything a pipeline run needs, from one YAML file and/or CLI flags."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..checkpoint import atomic_write
from ..config import DenoiseConfig
from .recipes import RECIPES, apply_recipe, recipe_targets

STAGES = ("baseline", "control", "matched-control", "denoise", "head")
AMP_MODES = ("none", "bf16")
DENOISE_INITS = ("calibrate", "identity")
SELECTIONS = ("last", "best")
DEFAULT_LAMBDA = 0.5  # label-aug's λ when --lambda is not given


@dataclass
class TrainConfig:
    """A run: the baseline recipe, and the recipe of the extra stages that are compared to it.

    ``control``, ``denoise`` and ``head`` all start from the baseline's weights and run the
    same number of extra steps (``extra_epochs``) with the same optimizer and learning rate,
    so that a gain of DenoiseRep over ``control`` is not just "trained longer".

    ``recipe`` names a preset (`denoiserep.train.recipes`, e.g. ``"paper"``: the authors' released
    protocol). `from_dict` (hence the CLI, YAML files and ``denoiserep demo``) fills in the preset's
    values for the fields the input does not give; a field given explicitly always wins.
    """

    # task and data
    task: str = "classification"
    data: str = "digits"
    extra_data: list[str] = field(default_factory=list)  # unlabeled images, label-free loss only
    denoise_data: str | None = None  # train the denoisers on these unlabeled images (label-free only)
    image_size: int | None = None
    # model
    model: str | None = None  # any timm model; None = the embedded dataset's default
    model_kwargs: dict = field(default_factory=dict)
    init: str | None = None  # start the baseline from this checkpoint instead of training it
    # With init: a checkpoint whose classifier has another number of classes loads without it, and the
    # model's freshly initialised classifier is trained (a pretrained start for new classes).
    reset_classifier: bool = False
    convert_scope: str = "backbone"  # what DenoiseRep converts: the backbone / encoder, or (where offered) "all"
    crop_size: int | None = None  # segmentation: training crop and sliding-window size (default per data set)
    slide_stride: int | None = None  # segmentation: evaluate with sliding windows this far apart (None: whole image)
    # baseline recipe
    epochs: int = 30
    batch_size: int = 64  # global batch, split across DDP ranks
    eval_batch_size: int = 256
    opt: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    sched: str = "cosine"
    sched_decay_rate: float = 0.1  # timm's decay_rate: the power of "poly", the factor of "step"
    warmup_epochs: int = 2
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_clip: float | None = None
    amp: str = "none"
    ema_decay: float | None = None
    # extra stages
    extra_epochs: int = 10
    extra_lr: float = 1e-3
    # The extra stages restart the learning-rate schedule (`sched` over `extra_epochs` from `extra_lr`),
    # after this many warm-up epochs from 1% of `extra_lr` (the authors' ReID scripts warm up again).
    extra_warmup_epochs: int = 0
    lam: float | None = None  # Loss = (1 − λ)·task + λ·denoise; None: λ = 0.5 (`effective_lambda`)
    # Loss = task + w·denoise, as the authors' code adds it: the task loss trains the backbone (through
    # W′), the noise loss the denoisers, and the task loss never reaches the denoisers. Excludes --lambda.
    noise_weight: float | None = None
    label_free: bool = False  # λ = 1: no labels used at all
    # The authors' option: epochs alternate every K between "denoisers train, backbone frozen" and
    # "backbone trains on the task loss through W′, denoisers frozen" (denoisers first).
    alternate_every: int | None = None
    recipe: str | None = None  # a named preset (`denoiserep.train.recipes.RECIPES`), e.g. "paper"
    # Which epoch a stage keeps: "last", or "best" (its best validation metric; every epoch is evaluated).
    select: str = "last"
    # The baseline stops when its validation metric has not improved for this many epochs and keeps
    # its best epoch (a baseline trained to convergence; needs select "best").
    baseline_patience: int | None = None
    # Hold out this fraction of the validation split as a test split: stages evaluate (and select) on
    # the rest, and report their final weights on the test split, which nothing else reads. 0: none.
    test_fraction: float = 0.0
    # "calibrate": the denoise stage first sets every denoiser to the closed-form optimum of its
    # noise loss (`denoiserep.calibrate`, on up to `calibrate_batches` training batches), then trains
    # its epochs from there; "identity": the paper's start (the converted model equals the baseline).
    denoise_init: str = "calibrate"
    calibrate_batches: int = 100
    # Calibration passes: each later pass refits every layer to the inputs the earlier layers'
    # calibrated denoisers produce; "auto" adds passes while a layer would end above its starting
    # loss on the held-out batches (`denoiserep.calibrate(passes=...)`).
    calibrate_passes: int | str = "auto"
    denoise: dict = field(default_factory=dict)  # DenoiseConfig fields
    head_steps: int = 10  # DenoiseRep⁻ reverse steps
    # run
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    threads: int | None = None  # torch CPU threads; None: 1 for small models, torch's default otherwise
    # torch.compile the training forward and backward (CUDA graphs on a GPU, "reduce-overhead"): the
    # same step, fewer launches; the first steps pay the compilation.
    compile: bool = False
    skip_bad_images: bool = False  # replace unreadable training images (logged) instead of stopping
    output: str = "runs"
    name: str = "run"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"--lambda must be in [0, 1] (Loss = (1 − λ)·task + λ·denoise), got {self.lam}")
        if self.noise_weight is not None and (self.lam is not None or self.label_free):
            given = "--lambda" if self.lam is not None and not self.label_free else "--label-free"
            raise ValueError(
                f"--noise-weight ({self.noise_weight}) and {given} are two forms of the loss: task + w·noise (the "
                "authors' code) or (1 − λ)·task + λ·noise (the slides; --label-free is λ = 1). Give one of them."
            )
        if self.label_free:
            self.lam = 1.0
        if self.label_free and self.alternate_every is not None:
            raise ValueError(
                f"--alternate-every {self.alternate_every} trains the backbone on the task loss in every other phase, "
                "but --label-free uses no labels, so those phases would train nothing. Drop one of them."
            )
        if self.denoise_data and (self.alternate_every is not None or self.noise_weight is not None):
            raise ValueError(
                f"--denoise-data {self.denoise_data} holds unlabeled images, but --alternate-every / --noise-weight "
                "train the backbone on the labeled task loss; train the denoisers on the labeled --data instead."
            )
        if self.denoise_data and self.effective_lambda < 1.0:
            raise ValueError(
                f"label-aug (λ = {self.effective_lambda} < 1) needs labels, but --denoise-data {self.denoise_data} is "
                "a folder of unlabeled images. Use --label-free, or train the denoisers on the labeled --data."
            )
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown --recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.baseline_patience is not None:
            if self.baseline_patience < 1:
                raise ValueError(f"--baseline-patience must be >= 1 epoch, got {self.baseline_patience}")
            if self.select != "best":
                raise ValueError("--baseline-patience stops the baseline once its validation metric stops improving "
                                 "and keeps its best epoch: it needs --select best")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.denoise_init not in DENOISE_INITS:
            raise ValueError(f"--denoise-init must be one of {', '.join(DENOISE_INITS)}, got {self.denoise_init!r}")
        for name in ("epochs", "extra_epochs", "extra_warmup_epochs", "batch_size", "eval_batch_size", "head_steps",
                     "calibrate_batches", "image_size", "threads", "workers", "crop_size", "slide_stride"):
            value, lowest = getattr(self, name), 0 if name in ("epochs", "extra_epochs", "extra_warmup_epochs",
                                                                 "workers") else 1
            if value is not None and value < lowest:
                raise ValueError(f"{name} must be {'≥ 0' if lowest == 0 else 'positive'}, got {value}")
        if self.calibrate_passes != "auto" and self.calibrate_passes < 1:
            raise ValueError(f"calibrate_passes must be 'auto' or >= 1, got {self.calibrate_passes}")
        if self.alternate_every is not None and self.alternate_every < 1:
            raise ValueError(f"alternate_every must be >= 1 epoch, got {self.alternate_every}")
        _check_ranges(self)
        self.denoise_config()  # validate early: a bad field fails before any training

    @property
    def effective_lambda(self) -> float:
        """λ of the (1 − λ)·task + λ·noise loss: ``lam``, or 0.5 when it is not given."""
        return DEFAULT_LAMBDA if self.lam is None else self.lam

    def denoise_config(self, root=None) -> DenoiseConfig:
        """The DenoiseConfig of ``denoise``; with the module a recipe converts (``root``), the recipe's
        layer selection for it fills in what ``denoise`` leaves unset (`recipes.recipe_targets`)."""
        values = dict(self.denoise)
        if self.recipe is not None and root is not None:
            values = {**recipe_targets(self.recipe, root, values), **values}
        try:
            return DenoiseConfig.from_dict(values)
        except TypeError as error:
            known = ", ".join(f.name for f in fields(DenoiseConfig))
            raise ValueError(f"bad 'denoise' settings {self.denoise}: {error}. Known fields: {known}") from error

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of TrainConfig fields")
        return cls.from_dict({**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ValueError(f"a run's settings must be a mapping of TrainConfig fields, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**apply_recipe(values))


# What each annotation accepts. YAML and JSON give ints for 3 and floats for 3.0: a float field
# takes an int; an int field takes no float, bool or string (``epochs: 1.7`` is a mistake, not 1).
_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a mapping (YAML) / JSON object"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "int | str": (lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)), "'auto' or an integer"),
}


# Number fields and the values that make sense: (flag, lowest, highest, lowest included, highest included).
# Written as `not lo <= v <= hi`, so that NaN (YAML's .nan, `--lr nan`) fails too.
_RANGES = {
    "lr": ("--lr", 0.0, float("inf"), False, False),
    "extra_lr": ("--extra-lr", 0.0, float("inf"), False, False),
    "weight_decay": ("--weight-decay", 0.0, float("inf"), True, False),
    "sched_decay_rate": ("--sched-decay-rate", 0.0, float("inf"), False, False),
    "warmup_epochs": ("--warmup-epochs", 0, float("inf"), True, False),
    "label_smoothing": ("--label-smoothing", 0.0, 1.0, True, False),
    "mixup": ("--mixup", 0.0, float("inf"), True, False),
    "cutmix": ("--cutmix", 0.0, float("inf"), True, False),
    "grad_clip": ("--grad-clip", 0.0, float("inf"), False, False),
    "ema_decay": ("--ema", 0.0, 1.0, False, False),
    "noise_weight": ("--noise-weight", 0.0, float("inf"), True, False),
    "test_fraction": ("--test-fraction", 0.0, 1.0, True, False),
}


def _check_ranges(cfg: "TrainConfig") -> None:
    for name, (flag, low, high, low_in, high_in) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ValueError(f"{flag} ({name}) must be in {interval}, got {value}{_RANGE_HINTS.get(name, '')}")


_RANGE_HINTS = {
    "ema_decay": " (the weight of the old average per step, e.g. 0.999)",
    "grad_clip": " (the largest gradient norm; leave it unset for no clipping)",
    "label_smoothing": " (the probability mass spread over the other classes, e.g. 0.1)",
    "test_fraction": " (e.g. 0.5: half of the validation split becomes a held-out test split; 0: none)",
}


def _check_types(cfg: "TrainConfig") -> None:
    """A one-line error naming the field, its value and what it must be (YAML and --model-kwargs
    JSON arrive untyped)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type.removesuffix(" | None")
        if value is None and f.type.endswith(" | None"):
            continue
        check, expected = _CHECKS[kind]
        if not check(value):
            raise ValueError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__})")
        if kind == "float":
            setattr(cfg, f.name, float(value))
