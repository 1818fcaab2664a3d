"""Issue 16 probe: a coarse head on the refiner's own frozen LiteMedSAM encoder; prints JSON.

One validation fold of ``models/default_split.json`` (never its test split). Each training and
validation image goes once through the frozen TinyViT of the refiner (in the refiner's input
space: letterboxed 256², the same pass serving already makes), keeping two of its feature maps —
stage 1 (160 × 64², the last high-resolution stage) and the neck (256 × 64², the embedding the
refiner decodes) — for the image and its left-right mirror. A small head then trains on those
cached features plus an image path (two convolutions on the 256² input, at 128²), with a
lesion-present output so that lesion-free images can come back empty:

    stage 1 ─1×1─┐
                 ├─ 3×3 ─ 3 dilated residual blocks (1, 2, 4) ─┬─ presence: avg+max pool → 1 logit
    neck ───1×1─┘                                               └─ ×2 ⊕ image path (128²) ─ 1 logit/px ─ ×2

The head's masks are scored like phase 1 (per image at native resolution, lesion images of the
fold; false-positive rate on its lesion-free images) and, refined by the shipped model's refiner
with the prompts derived from them, like the served path. The shipped TransUNet's numbers on the
same fold are reported beside them.

With ``--head sam-decoder`` the head is instead a copy of LiteMedSAM's own pretrained mask decoder,
prompted by a learned query (initialised as the prompt of a whole-image box) and a learned dense
prompt, on the neck embedding alone; its IoU output is trained as the lesion-present logit. Both
heads are also reported averaged with the shipped TransUNet's probabilities (``ensemble``), with
and without the head's presence gate.

With ``--tune lora|late`` the encoder is fine-tuned for the head, on a CPU budget: stages 0–1
(patch embedding, the 128² MBConv stage and the first 64² stage: three quarters of the encoder's
forward time, a tenth of its weights) stay frozen and their tokens are cached; a copy of stages 2–3
and the neck is trained with the head, either through low-rank adapters on each of its linear layers
(``lora``, ``--lora-rank``; the copy's weights stay the refiner's) or entirely (``late``). The
refiner keeps decoding the frozen embedding, so serving such a head would share the frozen stages
0–1 and run stages 2–3 twice (frozen for the refiner, tuned for the coarse head).

``--tune full --device cuda`` fine-tunes a copy of the whole encoder from the image (mirror
augmentation), the run a lent GPU is for; on the CPU it is ≈ 25–50 min per epoch.
``scripts/device/coarse_probe.sh`` runs it in one device call, with ``--time-budget-s`` cutting
the epoch count to what fits the call (timed before training starts, final evaluation included).

    python benchmarks/litemedsam_coarse_probe.py [--fold 0] [--epochs 30] [--width 96] [--limit N]
        [--head dilated|sam-decoder] [--tune none|lora|late|full] [--tune-lr 5e-4] [--lora-rank 8]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import REPO_ROOT, SHARED_DATA_ROOT
from training.machine import describe, has_native_bf16


class Block(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm1 = nn.GroupNorm(8, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


class Head(nn.Module):
    """Cached encoder features (+ the refiner input image) → mask logits 1×256² and a presence logit."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.stage1 = nn.Conv2d(160, width, 1)
        self.neck = nn.Conv2d(256, width, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU()
        )
        self.context = nn.Sequential(*(Block(width, d) for d in (1, 2, 4)))
        self.presence = nn.Linear(2 * width, 1)
        self.image = nn.Sequential(  # the refiner input at 128²: edges the 64² features lack
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU()
        )
        self.up = nn.Sequential(nn.Conv2d(width + 16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.GELU())
        self.out = nn.Conv2d(32, 1, 1)

    def forward(self, stage1, neck, image):
        x = self.fuse(torch.cat([self.stage1(stage1), self.neck(neck)], 1))
        x = self.context(x)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        presence = self.presence(pooled)[:, 0]
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.out(self.up(torch.cat([x, self.image(image)], 1)))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), presence


class SamDecoderHead(nn.Module):
    """LiteMedSAM's pretrained mask decoder as a prompt-free coarse head: a learned sparse query
    (started as the encoding of a whole-image box) and a learned dense prompt (started as the
    decoder's "no mask" embedding) replace the clinician's prompt. Neck embedding → single-mask
    logits 1×256² and a presence logit (the decoder's IoU output, retrained as such)."""

    def __init__(self, refiner) -> None:
        import copy

        super().__init__()
        prompt_encoder = refiner.prompt_encoder
        side = refiner.input_size
        with torch.no_grad():
            box = torch.tensor([[0.0, 0.0, side - 1.0, side - 1.0]])
            sparse, dense = prompt_encoder(points=None, boxes=box, masks=None)
            self.register_buffer("pe", prompt_encoder.get_dense_pe().detach().clone())
        self.decoder = copy.deepcopy(refiner.mask_decoder)
        self.query = nn.Parameter(sparse.detach().clone())  # 1×2×256
        self.dense = nn.Parameter(dense[:, :, :1, :1].detach().clone())  # 1×256×1×1

    def forward(self, stage1, neck, image):
        logits, presence = [], []
        dense = self.dense.expand(1, -1, neck.shape[-2], neck.shape[-1])
        for index in range(neck.shape[0]):
            low_res, iou = self.decoder(
                image_embeddings=neck[index : index + 1],
                image_pe=self.pe,
                sparse_prompt_embeddings=self.query,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res)
            presence.append(iou[:, 0])
        return torch.cat(logits), torch.cat(presence)


def early_stages(patch_embed: nn.Module, layers, image: torch.Tensor) -> torch.Tensor:
    """TinyViT patch embedding + stages 0–1 (``layers[:2]``) on ``B×3×256²`` → ``B×4096×160``
    tokens (64² grid); for the refiner's encoder or a tuned copy of its early part."""
    return layers[1](layers[0](patch_embed(image)))


def encode_tokens(encoder, image: torch.Tensor) -> torch.Tensor:
    """The refiner encoder's stage-1 tokens of ``image`` (:func:`early_stages`)."""
    return early_stages(encoder.patch_embed, encoder.layers, image)


def stage1_map(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.view(tokens.shape[0], 64, 64, -1).permute(0, 3, 1, 2)


def late_stages(layers, neck, tokens: torch.Tensor) -> torch.Tensor:
    """Stages 2–3 and the neck on stage-1 tokens → ``B×256×64²`` embedding."""
    x = tokens
    for layer in layers:
        x = layer(x)
    return neck(x.view(x.shape[0], 64, 64, -1).permute(0, 3, 1, 2))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha/r)·B·A`` (B starts at 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


class Trunk(nn.Module):
    """A copy of the encoder's stages 2–3 and neck for the coarse head, fine-tuned either with
    low-rank adapters on every linear layer (``lora``; the copy's own weights stay the refiner's)
    or entirely (``late``); with ``full`` a copy of the whole encoder, trained from the image
    (a GPU job). Batch norms keep the pretrained statistics (eval mode throughout)."""

    def __init__(self, encoder, mode: str, rank: int) -> None:
        import copy

        super().__init__()
        self.mode = mode
        if mode == "full":
            self.patch_embed = copy.deepcopy(encoder.patch_embed)
            self.early = copy.deepcopy(encoder.layers[:2])
        self.layers = copy.deepcopy(encoder.layers[2:])
        self.neck = copy.deepcopy(encoder.neck)
        for parameter in self.parameters():
            parameter.requires_grad_(mode in ("late", "full"))
        if mode == "lora":
            for module in list(self.layers.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(module, name, LoRALinear(child, rank, alpha=2.0 * rank))
        self.eval()

    def train(self, mode: bool = True):  # pretrained batch-norm statistics and bias tables stay
        return super().train(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return late_stages(self.layers, self.neck, tokens)

    def from_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``full`` mode: refiner-input images → (stage-1 tokens, embedding), both tuned."""
        tokens = early_stages(self.patch_embed, self.early, images)
        return tokens, self(tokens)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in names}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI")
    parser.add_argument("--split-file", type=Path, default=REPO_ROOT / "models" / "default_split.json")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default.pt")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--limit", type=int, help="Only N training and N validation images (a smoke run).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", choices=("dilated", "sam-decoder"), default="dilated")
    parser.add_argument(
        "--tune",
        choices=("none", "lora", "late", "full"),
        default="none",
        help="Fine-tune a copy of the encoder's stages 2–3 + neck for the head (stage-1 tokens cached): "
        "low-rank adapters on every linear layer, or all of it; 'full': the whole encoder from the image "
        "(for a GPU). The refiner keeps the frozen encoder.",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (caching, training, the head).")
    parser.add_argument("--tune-lr", type=float, default=5e-4, help="Peak learning rate of the tuned trunk.")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        help="Wall-clock budget of the whole probe (a lent GPU's call limit): the epoch count is cut, "
        "before training starts, to what fits after timing a few steps and one validation pass.",
    )
    parser.add_argument(
        "--skip-shipped",
        action="store_true",
        help="Skip the served pipeline's own evaluation of the fold (``transunet_val``, always "
        "reported, scores the shipped TransUNet + refiner on the same cached embeddings).",
    )
    parser.add_argument(
        "--busbra-root",
        type=Path,
        default=SHARED_DATA_ROOT / "BUSBRA-sample",
        help="Ultrasound from another hospital and scanner, scored too (a look, not a decision).",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    bf16 = has_native_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported()

    from training.data.datasets import list_samples, load_image, load_mask
    from training.data.splits import Split
    from training.data.transforms import coarse_input, refiner_input
    from training.evaluate import coarse_finds_lesion, image_record, served_refined, summarize
    from training.inference import Predictor

    split = Split.load(args.split_file)
    samples = list_samples("busi", args.root)
    train = split.train_ids(args.fold)
    val = split.val_ids(args.fold)
    if args.limit:
        train, val = train[: args.limit], val[: args.limit]
    by_id = {s.id: s for s in samples}
    other = list_samples("busbra", args.busbra_root) if args.busbra_root.is_dir() else []
    by_id.update({f"busbra:{s.id}": s for s in other})
    other_ids = [f"busbra:{s.id}" for s in other]
    predictor = Predictor.from_bundle(args.bundle)
    encoder = predictor.refiner.image_encoder.eval().to(device)  # back to the CPU for the shipped model

    started = probe_started = time.monotonic()
    cache: dict[str, dict] = {}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for sample_id in [*train, *val, *other_ids]:
            sample = by_id[sample_id]
            image = load_image(sample.image_path)
            mask = load_mask(sample)
            refiner_image, geometry = refiner_input(image, "litemedsam")
            target = (
                geometry.to_refiner(torch.from_numpy(mask.astype(np.float32))[None, None]) >= 0.5
            ).float()
            views = [refiner_image[None].to(device)]
            if sample_id in train:
                views.append(views[0].flip(-1))
            in_training = sample_id in train
            # full: training images are encoded afresh each step, so nothing of them is cached
            tokens = [] if args.tune == "full" and in_training else [encode_tokens(encoder, v) for v in views]
            # The frozen embedding: what the refiner decodes (validation) and, untuned, the head's input.
            necks = [
                late_stages(encoder.layers[2:], encoder.neck, t)
                for t in (tokens if args.tune == "none" else tokens[:1] if not in_training else [])
            ]
            with torch.autocast(device.type, enabled=False):  # the shipped TransUNet as served (fp32)
                transunet = predictor.coarse(coarse_input(image, predictor.coarse_size)[None])
                transunet = geometry.to_refiner(transunet.float().softmax(1)[:, 1:2])
            cache[sample_id] = {
                "transunet": transunet.half(),
                "image": refiner_image.half(),
                "target": target[0].half(),
                "tokens": [t.half().cpu() for t in tokens],
                "necks": [n.half().cpu() for n in necks],
                "geometry": geometry,
                "mask": mask,
                "label": sample.label,
                "native": image,
            }
    encode_s = time.monotonic() - started

    if args.head == "sam-decoder":
        from training.modeling.refiner import build_refiner

        head = SamDecoderHead(build_refiner())  # the pretrained LiteMedSAM decoder, not the shipped one
    else:
        head = Head(args.width)
    parameters = sum(p.numel() for p in head.parameters())
    groups = [{"params": list(head.parameters()), "lr": args.lr}]
    trunk = None
    tuned_parameters = 0
    head = head.to(device)
    if args.tune != "none":
        trunk = Trunk(encoder, args.tune, args.lora_rank).to(device)
        tuned = [p for p in trunk.parameters() if p.requires_grad]
        tuned_parameters = sum(p.numel() for p in tuned)
        groups.append({"params": tuned, "lr": args.tune_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1
    )

    def features(entry: dict, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's (stage-1 tokens, embedding) inputs for a cached entry, on the device."""
        if trunk is not None and trunk.mode == "full":
            image = entry["image"][None].float().to(device)
            return trunk.from_image(image.flip(-1) if view else image)
        tokens = entry["tokens"][view].float().to(device)
        if trunk is None:
            return tokens, entry["necks"][view].float().to(device)
        return tokens, trunk(tokens)

    full = trunk is not None and trunk.mode == "full"

    def batch(ids: list[str], flips: list[bool]):
        tokens, neck, images, targets = [], [], [], []
        for sample_id, flip in zip(ids, flips, strict=True):
            entry = cache[sample_id]
            view = 1 if flip else 0
            if not full:
                tokens.append(entry["tokens"][view].float())
            if trunk is None:
                neck.append(entry["necks"][view].float())
            image, target = entry["image"][None].float(), entry["target"][None].float()
            if flip:
                image, target = image.flip(-1), target.flip(-1)
            images.append(image)
            targets.append(target)
        tokens = torch.cat(tokens).to(device) if tokens else None
        neck = torch.cat(neck).to(device) if neck else None
        return tokens, neck, torch.cat(images).to(device), torch.cat(targets).to(device)

    #: The final evaluation's head outputs, computed once per image and shared by its variants
    #: (``None`` while training: the head changes every epoch).
    final_outputs: dict[str, tuple[torch.Tensor, float]] | None = None

    def predict(sample_id: str) -> tuple[torch.Tensor, float]:
        if final_outputs is not None and sample_id in final_outputs:
            return final_outputs[sample_id]
        entry = cache[sample_id]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens, neck = features(entry)
            logits, presence = head(stage1_map(tokens), neck, entry["image"][None].float().to(device))
        output = torch.sigmoid(logits.float()).cpu(), float(torch.sigmoid(presence.float())[0])
        if final_outputs is not None:
            final_outputs[sample_id] = output
        return output

    def validate(
        refine: bool = False,
        ids: list[str] | None = None,
        ensemble: bool = False,
        gate: bool = True,
        transunet_only: bool = False,
    ) -> dict:
        head.eval()
        records, refined_records = [], []
        for sample_id in val if ids is None else ids:
            entry = cache[sample_id]
            probs, presence = predict(sample_id)
            if transunet_only:  # the shipped TransUNet's mask, gated by the head's presence output
                probs = entry["transunet"].float()
            elif ensemble:  # the mean of the head's and the shipped TransUNet's probabilities
                probs = (probs + entry["transunet"].float()) / 2
            if gate and presence < 0.5:
                probs = torch.zeros_like(probs)
            geometry = entry["geometry"]
            native = geometry.from_refiner(probs)[0, 0].numpy()
            records.append(image_record(sample_id, entry["label"], entry["mask"], native))
            if refine:
                valid = geometry.valid_mask()
                found = coarse_finds_lesion(probs, valid)
                refined = native
                if found:
                    with torch.inference_mode():
                        output = predictor.refiner(entry["necks"][0].float(), probs, valid=valid)
                    refined = torch.sigmoid(geometry.from_refiner(output.refined_logits.float()))[
                        0, 0
                    ].numpy()
                served = served_refined(refined, native, found, predictor.refiner.cfg)
                refined_records.append(image_record(sample_id, entry["label"], entry["mask"], native, served))
        head.train()
        report = summarize(records)
        result = {"dice": report["dice_coarse"], "fp_rate": report["normal"]["fp_rate_coarse"]}
        if refine:
            refined_report = summarize(refined_records)
            result.update(
                dice_refined=refined_report["dice_refined"],
                fp_rate_refined=refined_report["normal"]["fp_rate_refined"],
            )
        return result

    def train_step(ids: list[str], flips: list[bool]) -> torch.Tensor:
        tokens, neck, images, targets = batch(ids, flips)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if full:
                tokens, neck = trunk.from_image(images)
            elif trunk is not None:
                neck = trunk(tokens)
            logits, presence = head(stage1_map(tokens), neck, images)
        logits, presence = logits.float(), presence.float()
        present = (targets.flatten(1).amax(1) > 0).float()
        probs = torch.sigmoid(logits)
        inter = (probs * targets).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (probs.flatten(1).sum(1) + targets.flatten(1).sum(1) + 1)
        dice = (dice * present).sum() / present.sum().clamp(min=1)
        loss = F.binary_cross_entropy_with_logits(logits, targets) + dice
        return loss + 0.5 * F.binary_cross_entropy_with_logits(presence, present)

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    epochs, budget = args.epochs, None
    if args.time_budget_s is not None:
        # Fit the schedule to the budget before it starts: time three steps and one validation
        # pass, and keep room for the final evaluation. The timed steps leave every weight as it
        # was: no optimizer step, gradients discarded, and nothing keeps running statistics (the
        # head normalises by groups; the trunk stays in eval mode).
        step_times = []
        for _ in range(3):
            tick = time.monotonic()
            train_step(train[: args.batch_size], [False] * min(args.batch_size, len(train))).backward()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.monotonic() - tick)
        tick = time.monotonic()
        validate()
        validate_s = time.monotonic() - tick
        # The final evaluation: the head once over the validation and BUS-BRA images, and the
        # refiner (on the CPU) for each of its 5 validation and 3 BUS-BRA variants.
        entry = cache[val[0]]
        probs, _ = predict(val[0])
        with torch.inference_mode():
            for _ in range(2):  # the second call is timed
                tick = time.monotonic()
                predictor.refiner(entry["necks"][0].float(), probs, valid=entry["geometry"].valid_mask())
        decode_s = time.monotonic() - tick
        final_s = validate_s * (1 + len(other_ids) / len(val)) + decode_s * (
            5 * len(val) + 3 * len(other_ids)
        )
        epoch_s = steps_per_epoch * float(np.median(step_times[1:])) + validate_s
        left = args.time_budget_s - (time.monotonic() - probe_started) - 1.2 * final_s
        epochs = min(args.epochs, int(left // epoch_s))
        budget = {
            "time_budget_s": args.time_budget_s,
            "step_s": round(float(np.median(step_times[1:])), 3),
            "validate_s": round(validate_s, 1),
            "final_evaluation_s": round(final_s, 1),
            "epochs_asked": args.epochs,
            "epochs_planned": epochs,
        }
        print(json.dumps({"budget": budget}), file=sys.stderr, flush=True)
        if epochs < 1:  # not one epoch and the final evaluation fit: say so instead of overrunning
            json.dump({"machine": describe(), "error": "--time-budget-s too small for one epoch",
                       "elapsed_s": round(time.monotonic() - probe_started, 1), "budget": budget},
                      sys.stdout, indent=1)  # fmt: skip
            sys.stdout.write("\n")
            raise SystemExit(3)
        if epochs < args.epochs:
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=epochs * steps_per_epoch,
                pct_start=0.1,
            )

    history, best, best_state = [], None, None
    started = time.monotonic()
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), args.batch_size):
            ids = [train[i] for i in order[start : start + args.batch_size]]
            flips = (torch.rand(len(ids), generator=generator) < 0.5).tolist()
            loss = train_step(ids, flips)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        entry = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            **validate(),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        history.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if best is None or (entry["dice"] or 0) > (best["dice"] or 0):
            best = entry
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best_trunk = trainable_state(trunk) if trunk is not None else None
    train_s = time.monotonic() - started
    head.load_state_dict(best_state)
    if trunk is not None:
        trunk.load_state_dict(best_trunk, strict=False)
    final_outputs = {}
    final = validate(refine=True)
    final_other = validate(refine=True, ids=other_ids) if other_ids else None
    variants = {
        "ensemble_val": validate(refine=True, ensemble=True, gate=False),
        "ensemble_gated_val": validate(refine=True, ensemble=True, gate=True),
        "transunet_val": validate(refine=True, transunet_only=True, gate=False),
        "transunet_gated_val": validate(refine=True, transunet_only=True, gate=True),
    }
    if other_ids:
        variants["ensemble_busbra_sample"] = validate(refine=True, ids=other_ids, ensemble=True, gate=False)
        variants["ensemble_gated_busbra_sample"] = validate(
            refine=True, ids=other_ids, ensemble=True, gate=True
        )

    # The shipped model on the same fold: its coarse TransUNet and the served refined mask.
    from training.evaluate import evaluate

    encoder.to("cpu")
    skip = args.skip_shipped
    shipped = None if skip else evaluate(predictor, [by_id[i] for i in val], phase=None)
    shipped_other = evaluate(predictor, other, phase=None) if other and not skip else None

    def brief(report):
        if report is None:
            return None
        return {
            "dice_coarse": report["dice_coarse"],
            "dice_refined": report["dice_refined"],
            "fp_rate_coarse": report["normal"]["fp_rate_coarse"],
            "fp_rate_refined": report["normal"]["fp_rate_refined"],
        }

    report = {
        "machine": describe(),
        "bf16_autocast": bf16,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "fold": args.fold,
        "n_train": len(train),
        "n_val": len(val),
        "head": args.head,
        "head_parameters": parameters,
        "tune": args.tune,
        "tune_lr": args.tune_lr if trunk is not None else None,
        "lora_rank": args.lora_rank if args.tune == "lora" else None,
        "tuned_parameters": tuned_parameters,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "encode_s": round(encode_s, 1),
        "budget": budget,
        "epochs_run": len(history),
        "train_s": round(train_s, 1),
        "best_epoch": best["epoch"],
        "head_val": final,
        "shipped_val": brief(shipped),
        "head_busbra_sample": final_other,
        "shipped_busbra_sample": brief(shipped_other),
        **variants,
        "history": history,
    }
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
