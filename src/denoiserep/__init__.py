"""DenoiseRep: denoising layers on a backbone's embedding layers, fused away after training.

    model = denoiserep.convert(model, DenoiseConfig(), example_inputs=batch)
    denoiserep.calibrate(model, (x for x, _ in loader))   # denoisers at their closed-form optimum
    denoiserep.set_trainable(model)                       # only the denoisers train (BatchNorm statistics frozen)
    loss = (1 - lam) * task_loss + lam * denoiserep.denoise_loss(model)
    model = denoiserep.fuse(model)                        # plain model, original architecture
"""

from .adapter import (
    disable_adapter,
    load_adapter,
    print_trainable_parameters,
    save_adapter,
    trainable_parameters,
    unload,
)
from .calibrate import CalibrationError, CalibrationReport, NoiseLossReport, calibrate, noise_loss_report
from .checkpoint import load_converted, load_fused, save_converted, save_fused
from .config import DenoiseConfig
from .convert import (
    conversion_summary,
    convert,
    denoise_loss,
    denoiser_parameters,
    is_converted,
    layer_denoisers,
    noise_loss_only,
    set_trainable,
)
from .fuse import FuseReport, FusionError, fuse
from .head import DenoiseHead
from .schedule import NoiseSchedule, make_schedule

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "DenoiseConfig",
    "DenoiseHead",
    "FuseReport",
    "FusionError",
    "NoiseLossReport",
    "NoiseSchedule",
    "calibrate",
    "conversion_summary",
    "convert",
    "denoise_loss",
    "denoiser_parameters",
    "disable_adapter",
    "fuse",
    "is_converted",
    "layer_denoisers",
    "load_adapter",
    "load_converted",
    "load_fused",
    "make_schedule",
    "noise_loss_only",
    "noise_loss_report",
    "print_trainable_parameters",
    "save_adapter",
    "save_converted",
    "save_fused",
    "set_trainable",
    "trainable_parameters",
    "unload",
]
