"""What a training step dispatches (BENCHMARKS.md §2b; the budget in docs/architecture.md). Every
operator is a kernel launch or a view on a GPU, where a step at common batches is launch-bound, so
these counts are its cost there; they are exact and the same on any machine."""

import pytest
import timm
import torch

from denoiserep.bench.dispatch import count_operators
from denoiserep.bench.launch import SETTINGS, layer_budget, training_step

# The operators one converted layer adds to a step (forward + backward) over the same layer trained plainly.
BUDGET = {
    ("Linear(384, 384) on 2 × 17 tokens", "default: sampled L1, W′"): 19,
    ("Linear(384, 384) on 2 × 17 tokens", "expected L1, auto path"): 33,
    ("Linear(384, 384) on 2 × 17 tokens", "expected L2, auto path"): 23,
    ("Linear(384, 384) on 2 × 17 tokens", "low rank (r=8), fraction 0.1"): 35,
    ("Conv2d 1 × 1, 256 → 64, no bias, 16 × 16", "default: sampled L1, W′"): 23,
    ("Conv2d 1 × 1, 256 → 64, no bias, 16 × 16", "expected L1, auto path"): 39,
    ("Conv2d 1 × 1, 256 → 64, no bias, 16 × 16", "expected L2, auto path"): 31,
    ("Conv2d 1 × 1, 256 → 64, no bias, 16 × 16", "low rank (r=8), fraction 0.1"): 54,
    ("Conv2d 3 × 3, 64 → 64, no bias, 16 × 16", "default: sampled L1, W′"): 25,
    ("Conv2d 3 × 3, 64 → 64, no bias, 16 × 16", "expected L1, auto path"): 36,
    ("Conv2d 3 × 3, 64 → 64, no bias, 16 × 16", "expected L2, auto path"): 24,
    ("Conv2d 3 × 3, 64 → 64, no bias, 16 × 16", "low rank (r=8), fraction 0.1"): 50,
}


def test_a_converted_layer_adds_no_more_operators_to_a_step_than_its_budget():
    measured = {(layer, setting): forward + backward for layer, setting, forward, backward in layer_budget()}
    assert set(measured) == set(BUDGET)
    over = {key: (count, BUDGET[key]) for key, count in measured.items() if count > BUDGET[key]}
    assert not over, f"operators per step above the budget (measured, budget): {over}"


@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[3]], ids=lambda setting: setting[0])
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "resnet50"])
def test_the_default_and_expected_l2_steps_dispatch_at_most_twice_the_operators_of_plain_fine_tuning(name, setting):
    assert setting[0] in ("default: sampled L1, W′", "expected L2, auto path")
    counts = {}
    for label, config, lam in (SETTINGS[0], setting):  # plain fine-tuning, the denoiser's setting
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **({"img_size": 64} if "vit" in name else {}))
        x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
        step = training_step(model, x, y, config, lam)
        step()  # the first step forms the views a step keeps
        counts[label] = count_operators(step).dispatched
    assert counts[setting[0]] <= 2.0 * counts[SETTINGS[0][0]], counts
