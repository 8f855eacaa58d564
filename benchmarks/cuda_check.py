"""What the CPU test suite cannot check: the method's CUDA paths agree with the CPU's.

    python benchmarks/cuda_check.py          # run by benchmarks/gpu.sh before the timings

On a small ViT (timm, random weights, float32): calibration on CUDA gives the CPU's denoisers; the
fused model equals the unfused one on CUDA; one label-aug training step's gradients agree between
the two training paths (W′ and the denoised input) and with the CPU's; and under bf16 autocast the
input path trains. Prints one markdown table; exits 1 if a check fails.
"""

from __future__ import annotations

import sys

import timm
import torch
import torch.nn.functional as F

import denoiserep as dr


def build(path: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    dr.convert(model, dr.DenoiseConfig(training_path=path), torch.randn(1, 3, 64, 64))
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> list[torch.Tensor]:
    dr.set_trainable(model, denoisers=True, backbone=False)
    model.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = 0.5 * F.cross_entropy(model(x), y) + 0.5 * dr.denoise_loss(model)
    loss.backward()
    return [p.grad.detach().cpu() for p in dr.denoiser_parameters(model)]


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_check.py: torch sees no CUDA device", file=sys.stderr)
        return 2
    # Compare float32 with float32: TF32 (cuDNN's default for convolutions) rounds to 10 bits.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 64, 64, generator=generator) for _ in range(4)]
    x, y = batches[0], torch.randint(0, 10, (8,), generator=generator)
    checks: list[tuple[str, float, float]] = []

    cpu_model, cuda_model = build(), build().cuda()
    dr.calibrate(cpu_model, batches)
    dr.calibrate(cuda_model, [b.cuda() for b in batches])
    cpu_A = torch.cat([p.detach().reshape(-1) for p in dr.denoiser_parameters(cpu_model)])
    cuda_A = torch.cat([p.detach().cpu().reshape(-1) for p in dr.denoiser_parameters(cuda_model)])
    checks.append(("calibrate: CUDA denoisers vs CPU (relative)", relative(cuda_A, cpu_A), 1e-4))

    cuda_model.eval()
    with torch.no_grad():
        unfused = cuda_model(x.cuda())
    fused_model = dr.fuse(cuda_model)
    with torch.no_grad():
        checks.append(("fuse: fused vs unfused on CUDA (relative)", relative(fused_model(x.cuda()), unfused), 1e-5))

    weight_grads = gradients(build("weight").cuda(), x.cuda(), y.cuda())
    input_grads = gradients(build("input").cuda(), x.cuda(), y.cuda())
    cpu_grads = gradients(build("weight"), x, y)
    worst = max(relative(a, b) for a, b in zip(input_grads, weight_grads))
    checks.append(("training step: input-path vs W′-path gradients on CUDA (worst relative)", worst, 1e-4))
    worst = max(relative(a, b) for a, b in zip(weight_grads, cpu_grads))
    checks.append(("training step: CUDA vs CPU gradients (worst relative)", worst, 1e-4))
    amp_weight = gradients(build("weight").cuda(), x.cuda(), y.cuda(), amp=True)
    amp_input = gradients(build("input").cuda(), x.cuda(), y.cuda(), amp=True)
    worst = max(relative(a, b) for a, b in zip(amp_input, amp_weight))
    checks.append(("bf16 autocast: input-path vs W′-path gradients (worst relative)", worst, 0.05))

    print(f"CUDA checks on {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| check | measured | tolerance | |\n|---|---|---|---|")
    failed = False
    for name, value, tolerance in checks:
        ok = value <= tolerance
        failed |= not ok
        print(f"| {name} | {value:.2e} | {tolerance:g} | {'ok' if ok else 'FAILED'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
