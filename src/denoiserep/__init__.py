"""DenoiseRep: denoising layers on a backbone's embedding layers, fused away after training.

    model = denoiserep.convert(model, DenoiseConfig(), example_inputs=batch)
    denoiserep.set_trainable(model)                       # only the denoisers train
    loss = (1 - lam) * task_loss + lam * denoiserep.denoise_loss(model)
    model = denoiserep.fuse(model)                        # plain model, original architecture
"""

from .checkpoint import load_converted, load_fused, save_converted, save_fused
from .config import DenoiseConfig
from .convert import (
    convert,
    denoise_loss,
    denoiser_parameters,
    is_converted,
    layer_denoisers,
    noise_loss_only,
    set_trainable,
)
from .fuse import FuseReport, fuse
from .head import DenoiseHead
from .schedule import NoiseSchedule, make_schedule

__version__ = "0.1.0"

__all__ = [
    "DenoiseConfig",
    "DenoiseHead",
    "FuseReport",
    "NoiseSchedule",
    "convert",
    "denoise_loss",
    "denoiser_parameters",
    "fuse",
    "is_converted",
    "layer_denoisers",
    "load_converted",
    "load_fused",
    "make_schedule",
    "noise_loss_only",
    "save_converted",
    "save_fused",
    "set_trainable",
]
