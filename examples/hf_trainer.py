"""DenoiseRep in a Hugging Face `Trainer`: convert, calibrate, train the denoisers with the Trainer's
own loop and checkpoints, resume, fuse, and `save_pretrained` the original architecture.

    pip install 'denoiserep[hf]'        # transformers + accelerate (the Trainer's dependency)
    python examples/hf_trainer.py --output runs/hf-example

What to copy into your own script:

1. `DenoiseRepTrainer.compute_loss`: Loss = (1 − λ)·task + λ·denoise_loss(model) while training;
   evaluation (eval mode, no gradients) accumulates no noise loss, so it returns the task loss alone.
2. `denoiserep.set_trainable(model)` before building the Trainer: it optimises what requires grad,
   i.e. only the denoisers, and the frozen backbone keeps its normalisation statistics.
3. Trainer checkpoints of a converted model hold the backbone under its original keys plus the
   denoisers (and `denoiserep_adapter.safetensors`): `resume_from_checkpoint` continues exactly, and
   `denoiserep.load_adapter(Model.from_pretrained(checkpoint), checkpoint)` rebuilds the converted model.
4. `denoiserep.fuse(model)`, then `save_pretrained`: a plain ViT again, for `from_pretrained` anywhere.

Everything runs offline on scikit-learn's 8×8 handwritten digits, with a small ViT built from a
config (no download); on your data, start from `from_pretrained` of your fine-tuned checkpoint instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import denoiserep


class Digits(torch.utils.data.Dataset):
    """scikit-learn's digits as 3 × 16 × 16 images in the dict form Hugging Face models take."""

    def __init__(self, split: str):
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        images = torch.nn.functional.interpolate(images[:, None], size=16, mode="bilinear").expand(-1, 3, -1, -1)
        labels = torch.tensor(digits.target)
        cut = int(0.8 * len(labels))
        self.images, self.labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


class DenoiseRepTrainer(Trainer):
    """The Trainer's loop with DenoiseRep's loss: (1 − λ)·task + λ·noise loss (λ = 1: label-free)."""

    def __init__(self, *args, lam: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam = lam

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training:  # evaluation runs without gradients: no noise loss to add
            loss = (1 - self.lam) * loss + self.lam * denoiserep.denoise_loss(model)
        return (loss, outputs) if return_outputs else loss


def accuracy(model: torch.nn.Module, dataset: Digits) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(pixel_values=dataset.images).logits.argmax(-1)
    return float((predictions == dataset.labels).float().mean())


def arguments(output: Path, max_steps: int, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output), max_steps=max_steps, per_device_train_batch_size=64, learning_rate=1e-3,
                  logging_steps=10, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, save_strategy="no")
    return TrainingArguments(**{**values, **overrides})


def converted_model(baseline: Path, example: dict) -> ViTForImageClassification:
    """Your fine-tuned model with denoisers on its embedding layers (the classifier is left out)."""
    model = ViTForImageClassification.from_pretrained(baseline)
    denoiserep.convert(model, denoiserep.DenoiseConfig(), example_inputs=example)
    denoiserep.set_trainable(model)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/hf-example"), help="where everything is written")
    parser.add_argument("--baseline-steps", type=int, default=120, help="steps of the stand-in fine-tuned model")
    parser.add_argument("--steps", type=int, default=20, help="denoiser training steps (a checkpoint at half)")
    parser.add_argument("--lam", type=float, default=0.5, help="λ: Loss = (1 − λ)·task + λ·noise loss")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, val = Digits("train"), Digits("val")

    # A stand-in for your fine-tuned model: a small ViT trained briefly (build from a config, no download).
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=3, intermediate_size=96, num_labels=10)
    baseline_model = ViTForImageClassification(config)
    Trainer(baseline_model, arguments(args.output / "baseline-run", args.baseline_steps), train_dataset=train).train()
    baseline_model.save_pretrained(args.output / "baseline")
    baseline_accuracy = accuracy(baseline_model, val)

    # Convert, calibrate (label-free, closed form), then train the denoisers with the Trainer.
    example = {"pixel_values": val.images[:8]}
    model = converted_model(args.output / "baseline", example)
    print(denoiserep.conversion_summary(model))
    denoiserep.calibrate(model, [{"pixel_values": train.images[i:i + 64]} for i in range(0, len(train), 64)],
                         progress=False)
    calibrated = {k: v.clone() for k, v in model.state_dict().items()}
    denoiserep.print_trainable_parameters(model)
    run = args.output / "denoise-run"
    half = args.steps // 2
    trainer = DenoiseRepTrainer(model, arguments(run, args.steps, save_strategy="steps", save_steps=half),
                                train_dataset=train, lam=args.lam)
    trainer.train()

    # Resume from the half-way checkpoint in a fresh model, as after an interruption: the same result.
    resumed = converted_model(args.output / "baseline", example)
    resumed.load_state_dict(calibrated)
    DenoiseRepTrainer(resumed, arguments(run, args.steps, save_strategy="steps", save_steps=half),
                      train_dataset=train, lam=args.lam).train(resume_from_checkpoint=str(run / f"checkpoint-{half}"))
    resume_difference = max(float((a - b).abs().max()) for a, b in
                            zip(model.state_dict().values(), resumed.state_dict().values()))

    # A checkpoint reloads as the converted model: the original backbone, then the adapter.
    checkpoint = run / f"checkpoint-{args.steps}"
    reloaded = denoiserep.load_adapter(ViTForImageClassification.from_pretrained(checkpoint), checkpoint)
    unfused_accuracy = accuracy(model, val)
    with torch.no_grad():
        reload_difference = float((reloaded.eval()(**example).logits - model.eval()(**example).logits).abs().max())

    # Fuse, then save the plain architecture.
    _, report = denoiserep.fuse(model.eval(), example_inputs=example, return_report=True)
    print(report.summary())
    model.save_pretrained(args.output / "fused")
    fused = ViTForImageClassification.from_pretrained(args.output / "fused")
    result = {"baseline_accuracy": baseline_accuracy, "unfused_accuracy": unfused_accuracy,
              "fused_accuracy": accuracy(fused, val), "fuse_max_relative_error": report.max_relative_error,
              "resume_max_difference": resume_difference, "checkpoint_reload_max_difference": reload_difference}
    for key, value in result.items():
        print(f"{key}: {value:.6g}")
    return result


if __name__ == "__main__":
    main()
