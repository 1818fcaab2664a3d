import pytest
import torch

from training.config import RefinerConfig
from training.modeling.prompts import (
    MASK_PROMPT_SIZE,
    Prompts,
    box_from_mask,
    mask_prompt,
    negative_point,
    positive_point,
    prompts_from_mask,
)

SIDE = 128


def disk(cx: float, cy: float, radius: float, side: int = SIDE, softness: float = 1.0) -> torch.Tensor:
    """``1×1×side×side`` soft disk probabilities."""
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    distance = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
    return torch.sigmoid((radius - distance) / softness)[None, None]


def test_all_prompts_from_a_disk():
    probs = disk(50, 70, 15)
    prompts = prompts_from_mask(probs, RefinerConfig(), mask_prompt_size=MASK_PROMPT_SIZE)
    assert prompts.points.shape == (1, 2, 2) and prompts.point_labels.tolist() == [[1.0, 0.0]]
    assert torch.allclose(prompts.points[0, 0], torch.tensor([50.0, 70.0]), atol=0.5)
    x0, y0, x1, y1 = prompts.boxes[0].tolist()
    # σ of a disk's x-coordinate is r/2: the box is centre ± 2.5·r/2.
    assert x0 == pytest.approx(50 - 1.25 * 15, abs=1.5) and x1 == pytest.approx(50 + 1.25 * 15, abs=1.5)
    assert y0 == pytest.approx(70 - 1.25 * 15, abs=1.5) and y1 == pytest.approx(70 + 1.25 * 15, abs=1.5)
    nx, ny = prompts.points[0, 1].tolist()
    assert not (x0 <= nx <= x1 and y0 <= ny <= y1), "negative point must lie outside the box"
    assert probs[0, 0, round(ny), round(nx)] < 0.01
    assert prompts.mask_logits.shape == (1, 1, MASK_PROMPT_SIZE, MASK_PROMPT_SIZE)


def test_box_is_clamped_and_negative_point_stays_in_the_valid_image():
    valid = torch.zeros(1, 1, SIDE, SIDE)
    valid[..., :, :80] = 1  # right part is padding
    probs = disk(70, 10, 20) * valid
    boxes = box_from_mask(probs, valid, 2.5, 0.05)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert y0 == 0 and 0 <= x0 < x1 <= 79 and y1 < SIDE
    point = negative_point(probs, valid, boxes, 0.05)[0]
    assert 0 <= point[0] <= 79 and 0 <= point[1] < SIDE
    inside = x0 <= point[0] <= x1 and y0 <= point[1] <= y1
    assert not inside


def test_empty_mask_gives_finite_prompts():
    prompts = prompts_from_mask(torch.zeros(2, 1, SIDE, SIDE), RefinerConfig())
    for value in (prompts.points, prompts.boxes, prompts.mask_logits):
        assert torch.isfinite(value).all()
    assert prompts.boxes[0, 0] <= 1 and prompts.boxes[0, 2] >= SIDE - 2  # whole image


def test_mask_prompt_scaling():
    probs = torch.zeros(1, 1, 64, 64)
    probs[..., 16:48, 16:48] = 1
    direct = mask_prompt(probs, "direct", 10.0, size=64)
    assert direct.max() == 10.0 and direct.min() == -10.0
    assert direct[0, 0, 32, 32] == 10 and direct[0, 0, 0, 0] == -10
    gaussian = mask_prompt(probs, "gaussian", 10.0, size=64)
    assert gaussian.min() >= -10 and gaussian.max() <= 10
    assert -10 < gaussian[0, 0, 16, 32] < 10  # the edge is blurred
    assert mask_prompt(probs, "direct", 10.0, size=256).shape == (1, 1, 256, 256)
    with pytest.raises(ValueError):
        mask_prompt(probs, "nope", 10.0)


@pytest.mark.parametrize(
    "which",
    ["point", "box", "negative", "mask_direct", "mask_gaussian"],
)
def test_every_prompt_is_differentiable(which):
    probs = disk(60, 64, 18, softness=3.0).requires_grad_()
    valid = torch.ones_like(probs)
    if which == "point":
        value = positive_point(probs, valid, 0.05)
    elif which == "box":
        value = box_from_mask(probs, valid, 2.5, 0.05)
    elif which == "negative":
        value = negative_point(probs, valid, box_from_mask(probs, valid, 2.5, 0.05), 0.05)
    else:
        value = mask_prompt(probs, which.split("_")[1], 10.0)
    (value * torch.linspace(1, 2, value.numel()).view_as(value)).sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_config_switches_prompts():
    probs = disk(60, 64, 18)
    only_box = prompts_from_mask(
        probs, RefinerConfig(use_point=False, use_negative_point=False, use_mask_prompt=False)
    )
    assert only_box.points is None and only_box.mask_logits is None and only_box.boxes is not None
    negative_only = prompts_from_mask(
        probs, RefinerConfig(use_point=False, use_box=False, use_mask_prompt=False)
    )
    assert negative_only.boxes is None and negative_only.point_labels.tolist() == [[0.0]]


def test_prompts_dataclass():
    with pytest.raises(ValueError):
        Prompts(points=torch.zeros(1, 1, 2))
    prompts = Prompts(points=torch.zeros(3, 1, 2), point_labels=torch.ones(3, 1), boxes=torch.zeros(3, 4))
    assert prompts.batch_size == 3 and not prompts.is_empty() and Prompts().is_empty()
    assert prompts.select(1).points.shape == (1, 1, 2)
