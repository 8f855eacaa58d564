"""`DenoiseConfig`: which layers get a denoiser, and how those denoisers behave."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from torch import nn

from .noise_loss import ESTIMATORS
from .schedule import SCHEDULES, NoiseSchedule, make_schedule

PATHS = ("auto", "weight", "input")  # LayerDenoiser's training paths

# The layer types a denoiser can be fused into exactly (all are affine in their input).
SUPPORTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LOSS_TYPES = ("l1", "l2", "l1+l2")
DENOISER_FORMS = ("full", "low_rank")
INITS = ("identity", "random")
# How layers get their timesteps: by execution order (ours), or as the authors' released code does.
TIMESTEP_MAPPINGS = ("execution", "authors-code")

_TYPE_NAMES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


@dataclass
class DenoiseConfig:
    """Configuration of a DenoiseRep conversion.

    Layer selection
        ``layer_types``: module types that get a denoiser (``nn.Linear``, ``nn.Conv1d/2d/3d``;
        names such as ``"Linear"`` are accepted too, for YAML configs).
        ``target_modules`` / ``exclude_modules``: as in PEFT. A string is a regular expression
        that must match the full module name; a list matches a name equal to an entry, ending
        with ``"." + entry``, or matching it as a glob (``"blocks.*.mlp.fc1"``).
        ``exclude_classifier``: leave the task head alone (timm's ``get_classifier()``, torchvision's
        ``fc`` / ``classifier`` / ``heads``, a Hugging Face task model's modules outside its base
        model such as ``classifier`` or SegFormer's ``decode_head``, detectors' heads: see
        `denoiserep.task_heads`), since DenoiseRep denoises the backbone's embedding layers.
        ``keep_state_dict_keys``: skip bias-free layers whose constant term has no BatchNorm
        to fold into (e.g. Swin's patch-merging ``reduction``), so that the fused state_dict
        has exactly the original keys and loads with ``strict=True`` into the original
        architecture. On by default (loadable first; `convert` warns and its summary lists the
        layers skipped); ``False`` denoises them too, and each gains a bias at fusion time
        (`fuse` reports it).

    Noise schedule
        ``schedule``: ``"linear"`` (β 1e-4→2e-3, the authors' code), ``"ddpm"`` (1e-4→0.02), ``"cosine"``.

    Timesteps
        ``timestep_mapping="execution"`` (default): layers are ordered by forward execution,
        ``L_1..L_N``, noisiest first. ``timestep_range=None``: ``t_i = N − i + 1`` (the paper).
        ``(lo, hi)``: ``t_1 = hi`` down to ``t_N = lo``, evenly spaced and rounded, e.g. ``(1, 1000)``
        spreads the layers over the schedule.
        ``timestep_mapping="authors-code"``: the timesteps the authors' released code assigns. Its
        conversion recurses over ``named_children()`` with a counter starting at N that each call
        decrements for the layers it converts and then loses, so a layer's t is N minus the number of
        converted layers that come before it among the direct children of its ancestors' frames
        (`denoiserep.convert.authors_code_timesteps`): in every ViT / Swin block ``mlp.fc1`` gets N and
        ``mlp.fc2`` N − 1. (Their tables are indexed from 0, so their "N" is one β-step later than
        our 1-based t = N; we keep the 1-based value.) Excludes ``timestep_range``.

    Denoiser
        ``denoiser``: ``"full"`` (d_in × d_in, as in the paper; block-diagonal for grouped convs)
        or ``"low_rank"`` (diagonal + rank-``rank`` product: ``A = diag(d) + U V``).
        ``init``: ``"identity"`` makes the converted model compute exactly the original one at
        step 0 (``c3·I − c1·A = I``), so training starts from the trained backbone's accuracy;
        ``"random"`` draws A, a and e at random (used by the exactness tests).
        ``sample_noise``: add the posterior noise term ``σ_t z`` with a fixed z drawn from a
        generator seeded by ``noise_seed`` (off by default: the posterior mean).

    Loss
        ``loss``: ``"l1"`` (the paper), ``"l2"`` or ``"l1+l2"``; each layer's loss is a mean over
        elements, and the model's loss is the sum over layers.
        ``loss_token_fraction``: estimate each layer's noise loss on this random fraction of
        the input positions (tokens or pixels); 1.0 uses all of them.
        ``loss_estimator``: ``"sampled"`` (default, the paper's) draws one ε per position;
        ``"expected"`` takes the loss's exact expectation over ε (closed form, `denoiserep.noise_loss`):
        the same objective with a noise-free gradient. With ``loss="l2"`` it is the cheapest label-aug
        step in multiply-adds and memory (BENCHMARKS.md §2); on a CPU it is faster for L1 too, on a
        GPU (launch-bound at common batches) its extra kernels make the step slower.

    Training path
        ``training_path``: how a training forward reaches A: ``"weight"`` forms W′ each forward,
        ``"input"`` denoises the layer's input (full-rank, expected estimator); ``"auto"`` takes the
        cheaper per call (fewer multiply-adds at that batch). Both are exact; eval always uses W′.
    """

    layer_types: Sequence[type[nn.Module] | str] = SUPPORTED_LAYER_TYPES
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    exclude_classifier: bool = True
    keep_state_dict_keys: bool = True
    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    timestep_range: tuple[int, int] | None = None
    timestep_mapping: str = "execution"
    denoiser: str = "full"
    rank: int = 8
    init: str = "identity"
    init_seed: int = 0
    sample_noise: bool = False
    noise_seed: int = 0
    loss: str = "l1"
    loss_token_fraction: float = 1.0
    loss_estimator: str = "sampled"
    training_path: str = "auto"

    def __post_init__(self) -> None:
        self.layer_types = tuple(_resolve_type(t) for t in self.layer_types)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.denoiser not in DENOISER_FORMS:
            raise ValueError(f"unknown denoiser form {self.denoiser!r}; choose 'full' or 'low_rank'")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be an integer >= 1 (the low_rank denoiser's rank), got {self.rank!r}")
        if not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 1):
            raise ValueError(f"num_timesteps must be an integer >= 1, got {self.num_timesteps!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose 'identity' or 'random'")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_TYPES)}")
        if not 0.0 < self.loss_token_fraction <= 1.0:
            raise ValueError(f"loss_token_fraction must be in (0, 1], got {self.loss_token_fraction}")
        if self.loss_estimator not in ESTIMATORS:
            raise ValueError(f"unknown loss_estimator {self.loss_estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.training_path not in PATHS:
            raise ValueError(f"unknown training_path {self.training_path!r}; choose one of {', '.join(PATHS)}")
        if self.training_path == "input" and (self.denoiser != "full" or self.loss_estimator != "expected"):
            raise ValueError("training_path 'input' needs denoiser 'full' and loss_estimator 'expected' "
                             "(it computes the expected noise loss from the layer's own A x); use 'auto' or 'weight'")
        if self.timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"unknown timestep_mapping {self.timestep_mapping!r}; choose one of "
                             f"{', '.join(TIMESTEP_MAPPINGS)}")
        if self.timestep_mapping == "authors-code" and self.timestep_range is not None:
            raise ValueError("timestep_mapping 'authors-code' assigns the authors' code's timesteps (N and N − 1 per "
                             f"block), which timestep_range {self.timestep_range} would replace; give one of them")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            if not 1 <= lo <= hi <= self.num_timesteps:
                raise ValueError(
                    f"timestep_range {self.timestep_range} must satisfy 1 <= lo <= hi <= "
                    f"num_timesteps ({self.num_timesteps})"
                )
            self.timestep_range = (int(lo), int(hi))
        self.make_schedule()  # a β outside (0, 1) fails here, not when the first layer is converted

    def make_schedule(self) -> NoiseSchedule:
        return make_schedule(self.schedule, self.num_timesteps, self.beta_start, self.beta_end)

    def timesteps_for(self, num_layers: int) -> list[int]:
        """Timestep of each selected layer, in execution order (first layer is noisiest)."""
        if self.timestep_range is None:
            if num_layers > self.num_timesteps:
                raise ValueError(
                    f"{num_layers} layers need t_i = N − i + 1 up to {num_layers}, but the schedule "
                    f"has only {self.num_timesteps} steps; raise num_timesteps or set timestep_range"
                )
            return [num_layers - i for i in range(num_layers)]
        lo, hi = self.timestep_range
        if num_layers == 1:
            return [hi]
        return [round(hi - i * (hi - lo) / (num_layers - 1)) for i in range(num_layers)]

    def to_dict(self) -> dict:
        """A YAML/JSON-friendly view (layer types by name)."""
        out = asdict(self)
        out["layer_types"] = [t.__name__ for t in self.layer_types]
        if isinstance(self.target_modules, (list, tuple)):
            out["target_modules"] = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            out["exclude_modules"] = list(self.exclude_modules)
        if self.timestep_range is not None:
            out["timestep_range"] = list(self.timestep_range)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "DenoiseConfig":
        values = dict(values)
        if values.get("timestep_range") is not None:
            values["timestep_range"] = tuple(values["timestep_range"])
        return cls(**values)


def _resolve_type(layer_type: type[nn.Module] | str) -> type[nn.Module]:
    if isinstance(layer_type, str):
        name = layer_type.split(".")[-1]
        if name not in _TYPE_NAMES:
            raise ValueError(
                f"layer type {layer_type!r} is not supported; DenoiseRep fuses into "
                f"{', '.join(_TYPE_NAMES)}"
            )
        return _TYPE_NAMES[name]
    if not (isinstance(layer_type, type) and issubclass(layer_type, SUPPORTED_LAYER_TYPES)):
        raise ValueError(
            f"layer type {layer_type!r} is not supported: a denoiser can only be fused exactly into "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYER_TYPES)} (and their subclasses). "
            "Remove it from layer_types."
        )
    return layer_type
