"""The one preprocessing of the project, shared by training, evaluation and serving.

An ultrasound image enters as an ``H×W`` (gray) or ``H×W×3`` (colour) array of any dtype and
leaves as:

* the coarse-segmenter input: ``1×S×S`` float32 in [0, 1], the whole image resized to ``S×S``
  (``S`` = ``TransUNetConfig.img_size``), see :func:`coarse_input`;
* the refiner input: ``3×L×L`` float32, longest side resized to ``L`` (or to the config's
  ``refiner.image_side``, smaller) and padded at the bottom and right with zeros, with the
  backbone's own intensity normalisation, see :func:`refiner_input`.

The :class:`Geometry` of the refiner input maps masks between the native image, the coarse
``S×S`` space and the refiner ``L×L`` space, differentiably (``F.interpolate`` + ``F.pad``).
Changing anything here must bump ``training.config.PREPROCESSING_VERSION``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Input side and intensity normalisation of each refiner backbone.
REFINER_INPUT_SIZE = {"litemedsam": 256, "sam_vit_b": 1024}
_SAM_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
_SAM_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def to_gray(image: np.ndarray) -> np.ndarray:
    """``H×W`` / ``H×W×C`` array of any dtype → ``H×W`` float32 gray (original intensity scale)."""
    array = np.asarray(image)
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[..., :3]
        if array.shape[2] == 1:
            array = array[..., 0]
        else:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            array = array[..., :3].astype(np.float32) @ weights
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D gray or 3-D colour image, got shape {np.asarray(image).shape}")
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(f"image is too small: {array.shape[1]}×{array.shape[0]} pixels")
    return array.astype(np.float32, copy=False)


def full_scale(image: np.ndarray) -> float:
    """The intensity a white pixel of ``image`` has: 255 for 8-bit; for other integer data the
    smallest ``2^b − 1`` that holds its maximum (12-bit DICOM: 4095); for floats 1 or the maximum."""
    array = np.asarray(image)
    peak = float(array.max()) if array.size else 0.0
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize == 1:
            return 255.0
        return float(2 ** max(8, int(np.ceil(np.log2(max(peak, 1.0) + 1)))) - 1)
    return max(1.0, peak)


def is_blank(image: np.ndarray, min_std: float, scale: float | None = None) -> bool:
    """Whether ``image`` is (near) uniform: its gray standard deviation is below ``min_std`` of its
    :func:`full_scale` (a black frame, a flat test pattern). Such an image has no lesion to find,
    and min-max scaling would only blow its noise up into a texture. ``min_std`` 0: never.
    ``scale``: the full scale of the image ``image`` was converted from, when it is already gray."""
    if min_std <= 0:
        return False
    gray = to_gray(image)
    return float(gray.std()) < min_std * (full_scale(image) if scale is None else scale)


def min_max(gray: np.ndarray | torch.Tensor):
    """Rescale to [0, 1]; a constant image becomes all zeros."""
    low, high = gray.min(), gray.max()
    scale = high - low
    if float(scale) <= 0:
        return gray * 0
    return (gray - low) / scale


@dataclass(frozen=True)
class Geometry:
    """Where a native ``height×width`` image sits inside a square refiner input of side ``size``:
    resized so that its longer side is ``image_side`` (``None``: ``size``), at the top left."""

    height: int
    width: int
    size: int
    image_side: int | None = None

    def __post_init__(self) -> None:
        if self.image_side is not None and not 1 <= self.image_side <= self.size:
            raise ValueError(f"image_side must be in [1, {self.size}], got {self.image_side}")

    @property
    def long_side(self) -> int:
        """The resized image's longer side in refiner space."""
        return self.size if self.image_side is None else self.image_side

    @property
    def resized_hw(self) -> tuple[int, int]:
        scale = self.long_side / max(self.height, self.width)
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_refiner(self, native_or_square: torch.Tensor) -> torch.Tensor:
        """``B×C×h×w`` map of the whole image (native or coarse ``S×S``) → ``B×C×L×L`` padded."""
        rh, rw = self.resized_hw
        resized = F.interpolate(native_or_square, size=(rh, rw), mode="bilinear", align_corners=False)
        return F.pad(resized, (0, self.size - rw, 0, self.size - rh))

    def from_refiner(self, refiner_map: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``B×C×L'×L'`` map in refiner space (any square side) → ``B×C×H×W`` native (or ``size``)."""
        rh, rw = self.resized_hw
        side = refiner_map.shape[-1]
        ch, cw = round(rh * side / self.size), round(rw * side / self.size)
        cropped = refiner_map[..., : max(1, ch), : max(1, cw)]
        target = size or (self.height, self.width)
        return F.interpolate(cropped, size=target, mode="bilinear", align_corners=False)

    def valid_mask(self, side: int | None = None) -> torch.Tensor:
        """``1×1×side×side`` float mask: 1 inside the image, 0 in the padding."""
        side = side or self.size
        rh, rw = self.resized_hw
        mask = torch.zeros(1, 1, side, side)
        mask[..., : round(rh * side / self.size), : round(rw * side / self.size)] = 1
        return mask


def coarse_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """Native image → ``1×size×size`` float32 in [0, 1] for TransUNet (the whole image, resized)."""
    gray = torch.from_numpy(min_max(to_gray(image)).copy())[None, None]
    resized = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(0, 1)


def refiner_input(
    image: np.ndarray, backbone: str, image_side: int | None = None
) -> tuple[torch.Tensor, Geometry]:
    """Native image → (``3×L×L`` float32 refiner input, its :class:`Geometry`); ``image_side``:
    the config's ``refiner.image_side`` (the resized image's longer side; ``None``: ``L``)."""
    if backbone not in REFINER_INPUT_SIZE:
        raise ValueError(f"unknown refiner backbone {backbone!r}; known: {sorted(REFINER_INPUT_SIZE)}")
    gray = to_gray(image)
    geometry = Geometry(
        height=gray.shape[0], width=gray.shape[1], size=REFINER_INPUT_SIZE[backbone], image_side=image_side
    )
    rh, rw = geometry.resized_hw
    tensor = torch.from_numpy(gray.copy())[None, None]
    resized = F.interpolate(tensor, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    resized = min_max(resized[0]).clamp_(0, 1).expand(3, rh, rw)
    if backbone == "sam_vit_b":
        resized = (resized * 255.0 - _SAM_PIXEL_MEAN) / _SAM_PIXEL_STD
    padded = F.pad(resized, (0, geometry.size - rw, 0, geometry.size - rh))
    return padded.contiguous(), geometry


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """``H×W`` boolean/0-255 mask → ``1×1×H×W`` float32 in {0, 1}."""
    return torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]


def coarse_target(mask: np.ndarray, size: int = 224) -> torch.Tensor:
    """Native mask → ``size×size`` long labels {0, 1} matching :func:`coarse_input`."""
    resized = F.interpolate(mask_to_tensor(mask), size=(size, size), mode="bilinear", align_corners=False)
    return (resized[0, 0] >= 0.5).long()
