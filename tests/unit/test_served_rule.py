"""One rule for validation and serving: an empty coarse mask is returned as it is, not refined."""

from __future__ import annotations

import numpy as np
import torch

from training.config import RefinerConfig
from training.data.datasets import list_samples
from training.data.splits import seeded_split
from training.evaluate import coarse_finds_lesion, served_refined
from training.modeling.refiner import build_refiner
from training.phases.context import RunContext, SampleStore
from training.phases.refiner_finetune import EmbeddingBank, validate_refiner


def test_the_rule_itself():
    probs = torch.zeros(1, 1, 8, 8)
    probs[..., 6:, 6:] = 0.9  # a lesion, but only in the padding
    valid = torch.zeros(1, 1, 8, 8)
    valid[..., :5, :5] = 1
    assert coarse_finds_lesion(probs) and not coarse_finds_lesion(probs, valid)
    refined, coarse = np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32)
    assert served_refined(refined, coarse, True, RefinerConfig()) is refined
    assert served_refined(refined, coarse, False, RefinerConfig()) is coarse
    assert served_refined(refined, coarse, False, RefinerConfig(refine_empty_coarse=True)) is refined


def test_refiner_validation_scores_what_serving_returns(tiny_training_config, fast_refiner_encoder):
    cfg = tiny_training_config(phases=["refiner"])
    samples = list_samples("busi", cfg.data.root)
    split = seeded_split(samples, cfg.data)
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), split=split, store=SampleStore(samples, cfg))
    items = [item for item in ctx.store.many([s.id for s in samples]) if item.lesion][:2]
    refiner = build_refiner(cfg.refiner)
    side = items[0].geometry.size
    empty = torch.zeros(1, 1, side, side)
    lesion = torch.zeros(1, 1, side, side)
    lesion[..., side // 4 : side // 2, side // 4 : side // 2] = 0.95
    maps = {items[0].id: empty, items[1].id: lesion}
    native = {item.id: item.geometry.from_refiner(maps[item.id])[0, 0].numpy() for item in items}
    report = validate_refiner(refiner, items, maps, native, EmbeddingBank(ctx, refiner), ctx, batch_size=2)
    first, second = report["per_image"]
    assert first["dice_refined"] == first["dice_coarse"] == 0.0 and first["iou_pred"] == 0.0  # not refined
    assert second["dice_refined"] != second["dice_coarse"]  # refined: the refiner's own mask

    refiner.cfg.refine_empty_coarse = True  # the setting serving honours, validation too
    report = validate_refiner(refiner, items, maps, native, EmbeddingBank(ctx, refiner), ctx, batch_size=2)
    assert report["per_image"][0]["iou_pred"] != 0.0
