"""DenoiseRep in PyTorch Lightning: one `LightningModule` for the baseline and for the denoisers, the
Trainer's checkpoints and resume, then fuse and save the original architecture.

    pip install 'denoiserep[lightning]'
    python examples/lightning_module.py --output runs/lightning-example   # ≈ 1 min on one CPU core

What to copy into your own module:

1. `training_step`: Loss = (1 − λ)·task + λ·denoise_loss(model) when the model is converted.
2. `configure_optimizers`: the parameters that require grad; after `denoiserep.set_trainable(model)`
   those are the denoisers, and the BatchNorm statistics stay frozen although Lightning calls
   `model.train()` every epoch.
3. Build the converted model in the same way before `fit(ckpt_path=…)`: Lightning's checkpoint holds
   the converted state_dict and resumes exactly.
4. `denoiserep.fuse(model)` and `denoiserep.save_fused`: the fused weights load with `strict=True`
   into a freshly built timm model.

Runs offline on scikit-learn's 8×8 digits with timm's smallest ResNet (`test_resnet`) built without downloads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import denoiserep


def digits(split: str) -> TensorDataset:
    data = load_digits()
    images = F.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0, size=16, mode="bilinear")
    labels = torch.tensor(data.target)
    cut = int(0.8 * len(labels))
    return TensorDataset(images[:cut], labels[:cut]) if split == "train" else TensorDataset(images[cut:], labels[cut:])


def build_model() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=10, in_chans=1, pretrained=False)


class Classifier(L.LightningModule):
    """Cross-entropy training of ``model``; a converted model adds λ times its noise loss."""

    def __init__(self, model: torch.nn.Module, lam: float = 0.5, lr: float = 1e-3):
        super().__init__()
        self.model, self.lam, self.lr = model, lam, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = task = F.cross_entropy(self.model(x), y)
        if denoiserep.is_converted(self.model):
            noise = denoiserep.denoise_loss(self.model)
            loss = (1 - self.lam) * task + self.lam * noise
            self.log("noise_loss", noise)
        self.log("task_loss", task)
        return loss

    def validation_step(self, batch, batch_index):
        x, y = batch
        self.log("val_top1", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def trainer(output: Path, max_epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=output, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def converted(baseline: Path, example: torch.Tensor) -> torch.nn.Module:
    model = denoiserep.load_fused(build_model(), baseline)
    # The expected noise loss (exact over ε) draws no random numbers: resuming is then exact as well.
    denoiserep.convert(model, denoiserep.DenoiseConfig(loss_estimator="expected"), example_inputs=example)
    denoiserep.set_trainable(model)
    return model


def accuracy(model: torch.nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/lightning-example"), help="where everything is written")
    parser.add_argument("--baseline-epochs", type=int, default=3, help="epochs of the stand-in trained model")
    parser.add_argument("--epochs", type=int, default=2, help="denoiser training epochs (a checkpoint after each)")
    parser.add_argument("--lam", type=float, default=0.5, help="λ: Loss = (1 − λ)·task + λ·noise loss")
    args = parser.parse_args(argv)
    L.seed_everything(0, verbose=False)
    train, val = digits("train"), digits("val")
    # A sampler that Lightning re-seeds every epoch (set_epoch): a resumed run sees the same batches.
    loader = DataLoader(train, batch_size=64, sampler=DistributedSampler(train, num_replicas=1, rank=0, seed=0))

    # A stand-in for your trained model.
    baseline = build_model()
    trainer(args.output / "baseline", args.baseline_epochs).fit(Classifier(baseline, lr=3e-3), loader)
    denoiserep.save_fused(baseline, args.output / "baseline.safetensors")
    baseline_accuracy = accuracy(baseline, val)

    # Convert, calibrate, then train only the denoisers, with checkpoints.
    example = val.tensors[0][:8]
    model = converted(args.output / "baseline.safetensors", example)
    denoiserep.calibrate(model, [x for x, _ in DataLoader(train, batch_size=64)], progress=False)
    calibrated = {k: v.clone() for k, v in model.state_dict().items()}
    denoiserep.print_trainable_parameters(model)
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    checkpoints = ModelCheckpoint(dirpath=args.output / "checkpoints", every_n_epochs=1, save_top_k=-1,
                                  filename="{epoch}")
    L.seed_everything(1, verbose=False)
    trainer(args.output / "denoise", args.epochs, callbacks=[checkpoints]).fit(
        Classifier(model, lam=args.lam), loader, DataLoader(val, batch_size=360))
    statistics_changed = max(float((model.state_dict()[k] - v).abs().max()) for k, v in statistics.items())

    # Resume from the first epoch's checkpoint in a freshly built module: the same denoisers at the end.
    L.seed_everything(1, verbose=False)
    resumed = converted(args.output / "baseline.safetensors", example)
    resumed.load_state_dict(calibrated)
    trainer(args.output / "denoise-resumed", args.epochs).fit(
        Classifier(resumed, lam=args.lam), loader, ckpt_path=str(args.output / "checkpoints" / "epoch=0.ckpt"))
    resume_difference = max(float((a - b).abs().max()) for a, b in
                            zip(model.state_dict().values(), resumed.state_dict().values()))

    unfused_accuracy = accuracy(model, val)
    _, report = denoiserep.fuse(model.eval(), example_inputs=example, return_report=True)
    print(report.summary())
    denoiserep.save_fused(model, args.output / "fused.safetensors")
    fused = denoiserep.load_fused(build_model(), args.output / "fused.safetensors")  # strict: the original keys
    result = {"baseline_accuracy": baseline_accuracy, "unfused_accuracy": unfused_accuracy,
              "fused_accuracy": accuracy(fused, val), "fuse_max_relative_error": report.max_relative_error,
              "norm_statistics_max_change": statistics_changed, "resume_max_difference": resume_difference}
    for key, value in result.items():
        print(f"{key}: {value:.6g}")
    return result


if __name__ == "__main__":
    main()
