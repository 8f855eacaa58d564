"""Named presets of `TrainConfig` fields: ``--recipe paper``, the protocol of the authors' released code.

What the authors' code does (RG12138/DenoiseRep @66e5609; docs/method.md §2b) and the field that
reproduces it:

- it starts from an already trained baseline and trains it further: the run's baseline stage (trained
  here, or ``--init CHECKPOINT --epochs 0``) and ``extra_epochs`` more;
- the extra epochs alternate every ``FT_EPOCH = 10`` between "denoisers train, backbone frozen" and
  "backbone trains on the task loss through W′, denoisers frozen", denoisers first
  (``Person-ReID/TransReID-SSL/transreid_pytorch/processor/processor.py``,
  ``train_cifar10_denoise.py``): ``alternate_every = 10``;
- the noise loss is *added* to the task loss with weight 0.1 (ReID) or 0.01 (CIFAR, Swin), and the
  task loss never reaches the denoisers: ``noise_weight = 0.1``; the loss is L1 + L2: ``loss "l1+l2"``;
- only Linear layers directly under modules named ``*mlp*`` are converted in ViT / Swin
  (``convert_vit_denoise_linear``); every layer in CNNs (the paper's ResNet-50 rows): `recipe_targets`;
- the learning rate restarts: ReID's ``train.py`` builds a fresh ``CosineLRScheduler`` over the extra
  epochs with a warm-up from 0.01·lr (``solver/scheduler_factory.py``; 20 of 240 epochs in
  ``configs/*/vit_small.yml``), CIFAR's a fresh ``CosineAnnealingLR`` without warm-up. We reproduce
  the ReID one: ``sched`` (cosine) over ``extra_epochs`` from ``extra_lr``, ``extra_warmup_epochs = 3``
  from 1% of it (cosine to 0 where theirs ends at 0.2% of lr);
- results are the best of frequent evaluations, on the test set: we keep the best epoch on the
  validation split (``select = "best"``) and report it on a held-out test split that selection never
  reads (``test_fraction = 0.5`` of the validation split).

Not reproduced, on purpose (docs/method.md §2): the fused bias's fresh ``randn`` at every fusion, fusion
into new Parameters the optimizer does not hold, the repeated re-fusion of already fused weights, and
the denoiser phase's forward through the plain W (ours runs the denoised chain without autograd, so
each denoiser learns on the inputs the fused model gives it). The denoisers start from identity (the
converted model equals the baseline), where theirs start at ``nn.Linear``'s random init. The authors'
timesteps are available as ``--timestep-mapping authors-code``; the preset keeps ours (execution
order, t_i = N − i + 1), the paper's own statement.
"""

from __future__ import annotations

import re

from torch import nn

# A Linear layer directly under a module whose name contains "mlp" (any case): ``blocks.3.mlp.fc1``,
# Swin's ``attn.cpb_mlp.0``; what ``convert_vit_denoise_linear`` converts.
MLP_LINEARS = r"(?i)(.*\.)?[^.]*mlp[^.]*\.[^.]+"

RECIPES: dict[str, dict] = {
    "paper": {
        "extra_epochs": 40,
        "alternate_every": 10,
        "noise_weight": 0.1,
        "denoise_init": "identity",
        "extra_warmup_epochs": 3,
        "select": "best",
        "test_fraction": 0.5,
        "denoise": {"loss": "l1+l2"},
    },
}
# The loss form's fields: an explicit one of them replaces the preset's ``noise_weight``.
_LAMBDA_FORM = ("lam", "label_free")


def apply_recipe(values: dict) -> dict:
    """``values`` (TrainConfig fields as given) with the named recipe's preset filled in where they are
    silent; ``denoise`` is merged key by key. An explicit ``lam`` / ``label_free`` selects the (1 − λ)
    form instead of the preset's ``noise_weight``."""
    name = values.get("recipe")
    if name is None or name not in RECIPES:
        return values  # no recipe, or an unknown one (TrainConfig names the known ones)
    preset = dict(RECIPES[name])
    if any(values.get(key) not in (None, False) for key in _LAMBDA_FORM):
        preset.pop("noise_weight", None)
    merged = {**preset, **values}
    if isinstance(values.get("denoise", {}), dict):
        merged["denoise"] = {**preset.get("denoise", {}), **values.get("denoise", {})}
    return merged


def demo_values(name: str, demo_defaults: dict) -> dict:
    """``denoiserep demo --recipe NAME``: the task's demo settings with the recipe scaled to them. For
    "paper": twice the demo's extra epochs in four phases (K = half its extra epochs; the authors: K = 10
    of 120–240), a warm-up of a tenth of them, in its own run folder (``<demo name>-paper``)."""
    extra = demo_defaults.get("extra_epochs", 10)
    return {**demo_defaults, "recipe": name, "name": f"{demo_defaults.get('name', 'demo')}-{name}",
            "extra_epochs": 2 * extra, "alternate_every": max(1, extra // 2), "extra_warmup_epochs": extra // 10}


def has_mlp_linears(root: nn.Module) -> bool:
    """Whether ``root`` has Linear layers directly under ``*mlp*`` modules (a ViT / Swin / MLP-Mixer)."""
    return any(isinstance(module, nn.Linear) and re.fullmatch(MLP_LINEARS, name)
               for name, module in root.named_modules())


def recipe_targets(name: str, root: nn.Module, given: dict) -> dict:
    """The layer selection of recipe ``name`` for the module it converts, unless ``given`` (the run's
    ``denoise`` settings) chooses layers itself: for "paper", the ``*mlp*`` Linears where the model has
    them (ViT, Swin, MLP-Mixer, and ConvNeXt, whose blocks hold ``mlp.fc1`` / ``mlp.fc2`` too), and every
    layer (the library's default selection) otherwise (ResNets, the MNIST-1D CNN)."""
    if name != "paper" or {"target_modules", "layer_types"} & set(given) or not has_mlp_linears(root):
        return {}
    return {"layer_types": ["Linear"], "target_modules": MLP_LINEARS}
