"""Phase 2a: offline mask augmentation — realistic corrupted "coarse predictions" from ground truth.

Each of the 12 corruption types imitates one failure of a coarse segmenter and targets its own
Dice band (:data:`CORRUPTIONS`). A corruption is a family of masks indexed by a strength
``s ≥ 0`` (nominally ``[0, 1]``) whose physical size scales with the lesion (its equivalent radius
``R = √(area/π)``); :func:`corrupt` draws a target Dice inside the band and bisects the strength
until the corrupted mask's Dice against the ground truth lands there, so small and large
lesions both land in their band. Hard masks become soft "probability maps" through
:func:`soft_mask`, ``sigmoid(SDF / T)`` with a signed distance function and a temperature ``T``
(pixels) drawn from ``[AugmentConfig.temperature_min, temperature_max]``.

Everything happens in refiner space at ``AugmentConfig.mask_size`` (the padded square of
:class:`training.data.transforms.Geometry`), where phase 2b uses the masks; foreground is never
placed in the padding.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from training.config import AugmentConfig
from training.data.transforms import Geometry, mask_to_tensor

#: Corruption type → (lowest, highest) Dice against the ground truth that it aims for.
CORRUPTIONS: dict[str, tuple[float, float]] = {
    "over_segmentation": (0.70, 0.92),  # dilation
    "under_segmentation": (0.70, 0.92),  # erosion
    "missing_chunk": (0.60, 0.90),  # a bite out of the boundary
    "interior_holes": (0.75, 0.95),  # holes inside the lesion
    "false_positive_islands": (0.65, 0.92),  # blobs beside the lesion
    "fragmentation": (0.50, 0.85),  # the lesion split by gaps
    "boundary_shift": (0.55, 0.90),  # translation
    "boundary_roughening": (0.80, 0.95),  # jagged, noisy contour
    "partial_cut": (0.40, 0.75),  # one side of the lesion cut off
    "empty_prediction": (0.0, 0.0),  # the lesion is missed entirely
    "noise_scatter": (0.75, 0.95),  # speckle flips near the boundary
    "combination": (0.30, 0.70),  # 2–3 of the above together
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)
_COMBINABLE = tuple(k for k in CORRUPTIONS if k not in ("empty_prediction", "combination"))
#: Corruptions able to pull Dice below 0.5 on their own; every combination includes one.
_STRONG = (
    "over_segmentation",
    "under_segmentation",
    "missing_chunk",
    "fragmentation",
    "boundary_shift",
    "partial_cut",
)
_SEARCH_STEPS = 12
_TOLERANCE = 0.01  # stop the search this close to the target Dice
_BAND_MARGIN = 0.15  # targets are drawn from the inner 70% of a band


class AugmentedMask(NamedTuple):
    kind: str
    soft: np.ndarray  # L×L float32 probabilities in (0, 1)
    dice: float  # Dice of the hard corrupted mask against the ground truth
    temperature: float


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks (both empty → 1.0)."""
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, target).sum()) / total


# --------------------------------------------------------------------------------------------
# Soft masks


def signed_distance(hard_mask: np.ndarray) -> np.ndarray:
    """Signed distance in pixels: ≥ +0.5 inside, ≤ −0.5 outside (the 0 level is the boundary)."""
    mask = np.asarray(hard_mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -float(sum(mask.shape)), dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, float(sum(mask.shape)), dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return np.where(mask, inside - 0.5, 0.5 - outside).astype(np.float32)


def soft_mask(hard_mask: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(SDF / T)`` as float32 in (0, 1); its 0.5 level is the hard mask's boundary."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = np.clip(signed_distance(hard_mask) / float(temperature), -80.0, 80.0)
    soft = 1.0 / (1.0 + np.exp(-scaled, dtype=np.float64))
    tiny = np.finfo(np.float32).eps
    return np.clip(soft, tiny, 1.0 - tiny).astype(np.float32)


def to_mask_space(
    mask: np.ndarray, size: int, image_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Native ``H×W`` mask → (``size×size`` bool mask in refiner space, bool valid region);
    ``image_side``: the refiner's (:class:`Geometry`)."""
    mask = np.asarray(mask)
    if mask.shape == (size, size):
        return mask > 0, np.ones((size, size), dtype=bool)
    geometry = Geometry(height=mask.shape[0], width=mask.shape[1], size=size, image_side=image_side)
    resized = geometry.to_refiner(mask_to_tensor(mask))[0, 0].numpy() >= 0.5
    return resized, geometry.valid_mask()[0, 0].numpy() > 0


# --------------------------------------------------------------------------------------------
# Corruption families: each maps the ground truth to ``strength ∈ [0, 1] → corrupted mask``


class _Lesion:
    """A ground-truth mask with lazily computed distance maps and coordinates."""

    def __init__(self, mask: np.ndarray, valid: np.ndarray) -> None:
        self.mask = mask
        self.valid = valid
        #: Equivalent radius √(area/π) in pixels: every corruption scales with it.
        self.radius = max(1.0, float(np.sqrt(mask.sum() / np.pi)))

    @classmethod
    def of(cls, mask: np.ndarray, valid: np.ndarray) -> _Lesion:
        return cls(mask, valid)

    @cached_property
    def inside(self) -> np.ndarray:
        """Distance to the background (0 outside the lesion)."""
        return ndimage.distance_transform_edt(self.mask)

    @cached_property
    def outside(self) -> np.ndarray:
        """Distance to the lesion (0 inside)."""
        return ndimage.distance_transform_edt(~self.mask)

    @cached_property
    def sdf(self) -> np.ndarray:
        return np.where(self.mask, self.inside, -self.outside)

    @cached_property
    def rows(self) -> np.ndarray:
        return np.indices(self.mask.shape, dtype=np.float32)[0]

    @cached_property
    def cols(self) -> np.ndarray:
        return np.indices(self.mask.shape, dtype=np.float32)[1]

    def pick(self, where: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        """A random pixel (row, col) of a boolean map (of the lesion itself if the map is empty)."""
        candidates = np.flatnonzero(where)
        if candidates.size == 0:
            candidates = np.flatnonzero(self.mask)
        index = candidates[rng.integers(candidates.size)]
        return float(index // self.mask.shape[1]), float(index % self.mask.shape[1])

    def smooth_noise(self, rng: np.random.Generator, sigma: float) -> np.ndarray:
        """Zero-mean, unit-variance Gaussian-smoothed noise of correlation length ``sigma`` pixels."""
        height, width = self.mask.shape
        factor = max(1, int(sigma // 2))  # smooth on a coarser grid, then upsample (much faster)
        coarse = rng.standard_normal((-(-height // factor) + 1, -(-width // factor) + 1))
        field = ndimage.gaussian_filter(coarse, sigma / factor, mode="wrap")
        if factor > 1:
            field = ndimage.zoom(field, factor, order=1)
        field = field[:height, :width]
        return (field - field.mean()) / max(float(field.std()), 1e-9)


Family = Callable[[float], np.ndarray]


def _over(lesion: _Lesion, rng: np.random.Generator) -> Family:
    # Anisotropy: a smooth ±20% modulation of the dilation radius.
    wobble = 1.0 + 0.2 * lesion.smooth_noise(rng, max(2.0, 0.5 * lesion.radius))
    return lambda s: lesion.mask | ((lesion.outside <= s * 1.2 * lesion.radius * wobble) & lesion.valid)


def _under(lesion: _Lesion, rng: np.random.Generator) -> Family:
    wobble = 1.0 + 0.2 * lesion.smooth_noise(rng, max(2.0, 0.5 * lesion.radius))
    depth = float(lesion.inside.max())
    return lambda s: lesion.inside > s * depth * wobble


def _missing_chunk(lesion: _Lesion, rng: np.random.Generator) -> Family:
    boundary = lesion.mask & (lesion.inside <= 1.5)
    centre = lesion.pick(boundary, rng)
    squash = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    dr, dc = lesion.rows - centre[0], lesion.cols - centre[1]
    u = dr * np.cos(angle) + dc * np.sin(angle)
    v = -dr * np.sin(angle) + dc * np.cos(angle)
    distance = np.sqrt(u**2 + (v / squash) ** 2)
    return lambda s: lesion.mask & (distance > s * 2.2 * lesion.radius)


def _interior_holes(lesion: _Lesion, rng: np.random.Generator) -> Family:
    deep = lesion.inside >= 0.35 * lesion.inside.max()
    count = int(rng.integers(1, 4))
    holes = [(lesion.pick(deep, rng), rng.uniform(0.6, 1.0)) for _ in range(count)]
    distance = np.min(
        [np.sqrt((lesion.rows - c[0]) ** 2 + (lesion.cols - c[1]) ** 2) / scale for c, scale in holes], axis=0
    )
    # Holes stay inside: they never open the contour (≥ 1 px of lesion is kept around them).
    return lambda s: lesion.mask & ~((distance <= s * 0.9 * lesion.radius) & (lesion.inside > 1.5))


def _false_positive_islands(lesion: _Lesion, rng: np.random.Generator) -> Family:
    near = (lesion.outside >= 0.6 * lesion.radius) & (lesion.outside <= 2.5 * lesion.radius) & lesion.valid
    count = int(rng.integers(1, 4))
    islands = [(lesion.pick(near if near.any() else lesion.valid & ~lesion.mask, rng), rng.uniform(0.5, 1.0))]
    islands += [
        (lesion.pick(lesion.valid & ~lesion.mask, rng), rng.uniform(0.3, 0.8)) for _ in range(count - 1)
    ]
    distance = np.min(
        [np.sqrt((lesion.rows - c[0]) ** 2 + (lesion.cols - c[1]) ** 2) / scale for c, scale in islands],
        axis=0,
    )
    wobble = 1.0 + 0.25 * lesion.smooth_noise(rng, max(2.0, 0.3 * lesion.radius))
    return lambda s: lesion.mask | ((distance <= s * 1.5 * lesion.radius * wobble) & lesion.valid)


def _fragmentation(lesion: _Lesion, rng: np.random.Generator) -> Family:
    count = int(rng.integers(2, 5))
    core = lesion.inside >= 0.3 * lesion.inside.max()
    gaps = []
    for _ in range(count):
        centre = lesion.pick(core, rng)
        angle = rng.uniform(0, np.pi)
        gaps.append(
            np.abs((lesion.rows - centre[0]) * np.cos(angle) - (lesion.cols - centre[1]) * np.sin(angle))
        )
    distance = np.min(gaps, axis=0)
    return lambda s: lesion.mask & (distance > s * 0.5 * lesion.radius)


def _shift(mask: np.ndarray, d_row: int, d_col: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(d_row) >= h or abs(d_col) >= w:
        return out
    src = mask[max(0, -d_row) : h - max(0, d_row), max(0, -d_col) : w - max(0, d_col)]
    out[max(0, d_row) : max(0, d_row) + src.shape[0], max(0, d_col) : max(0, d_col) + src.shape[1]] = src
    return out


def _boundary_shift(lesion: _Lesion, rng: np.random.Generator) -> Family:
    angle = rng.uniform(0, 2 * np.pi)

    def family(s: float) -> np.ndarray:
        distance = s * 1.6 * lesion.radius
        moved = _shift(lesion.mask, round(distance * np.sin(angle)), round(distance * np.cos(angle)))
        return moved & lesion.valid

    return family


def _boundary_roughening(lesion: _Lesion, rng: np.random.Generator) -> Family:
    noise = lesion.smooth_noise(rng, max(1.0, 0.12 * lesion.radius))
    sdf = lesion.sdf
    return lambda s: ((sdf + s * 0.8 * lesion.radius * noise) > 0) & lesion.valid


def _partial_cut(lesion: _Lesion, rng: np.random.Generator) -> Family:
    angle = rng.uniform(0, 2 * np.pi)
    projection = lesion.rows * np.sin(angle) + lesion.cols * np.cos(angle)
    values = np.sort(projection[lesion.mask])

    def family(s: float) -> np.ndarray:
        removed = min(s * 0.95, 0.99)
        cut = values[min(len(values) - 1, int((1.0 - removed) * len(values)))]
        return lesion.mask & (projection < cut) if removed > 0 else lesion.mask.copy()

    return family


def _empty(lesion: _Lesion, rng: np.random.Generator) -> Family:
    return lambda s: np.zeros_like(lesion.mask)


def _noise_scatter(lesion: _Lesion, rng: np.random.Generator) -> Family:
    width = max(2.0, 0.4 * lesion.radius)
    band = (np.abs(lesion.sdf) <= width) & lesion.valid
    # Speckles of a pixel or two: lightly smoothed uniform noise, ranked to uniform again.
    field = ndimage.gaussian_filter(rng.random(lesion.mask.shape), 0.6)
    ranks = np.empty(field.size)
    ranks[np.argsort(field, axis=None)] = np.linspace(0, 1, field.size)
    ranks = ranks.reshape(field.shape)
    return lambda s: np.where(band & (ranks < s * 0.7), ~lesion.mask, lesion.mask)


_FAMILIES: dict[str, Callable[[_Lesion, np.random.Generator], Family]] = {
    "over_segmentation": _over,
    "under_segmentation": _under,
    "missing_chunk": _missing_chunk,
    "interior_holes": _interior_holes,
    "false_positive_islands": _false_positive_islands,
    "fragmentation": _fragmentation,
    "boundary_shift": _boundary_shift,
    "boundary_roughening": _boundary_roughening,
    "partial_cut": _partial_cut,
    "empty_prediction": _empty,
    "noise_scatter": _noise_scatter,
}


def _combination(lesion: _Lesion, rng: np.random.Generator) -> Family:
    strong = _STRONG[int(rng.integers(len(_STRONG)))]
    others = [k for k in _COMBINABLE if k != strong]
    extra = rng.choice(len(others), size=int(rng.integers(1, 3)), replace=False)
    kinds = [strong] + [others[k] for k in extra]
    order = rng.permutation(len(kinds))
    kinds = [kinds[k] for k in order]
    weights = np.where(np.array(kinds) == strong, 1.0, rng.uniform(0.5, 1.0, size=len(kinds)))
    seeds = rng.integers(0, 2**63, size=len(kinds))

    def family(s: float) -> np.ndarray:
        current = lesion
        result = lesion.mask
        for kind, weight, seed in zip(kinds, weights, seeds, strict=True):
            if not result.any():
                break
            if current is None:
                current = _Lesion.of(result, lesion.valid)
            result = _FAMILIES[kind](current, np.random.default_rng(seed))(s * weight)
            current = None
        return result

    return family


_FAMILIES["combination"] = _combination


# --------------------------------------------------------------------------------------------
# Strength search


def _search(family: Family, target_mask: np.ndarray, band: tuple[float, float], goal: float):
    """Bisect the strength so that Dice(family(s), ground truth) ≈ ``goal``; prefer in-band results.

    Strengths above 1 are tried (up to 4) when ``s = 1`` is not yet strong enough, e.g. islands
    beside a lesion that fills most of the image.
    """
    best: tuple[float, np.ndarray, float] | None = None  # (score, mask, dice)

    def evaluate(strength: float) -> float:
        nonlocal best
        candidate = family(strength)
        value = dice(candidate, target_mask)
        score = abs(value - goal) + (0.0 if band[0] <= value <= band[1] else 10.0)
        if best is None or score < best[0]:
            best = (score, candidate, value)
        return value

    low, high = 0.0, 1.0
    value = evaluate(high)
    while value > goal and high < 4.0:
        low, high = high, 2.0 * high
        value = evaluate(high)
    for _ in range(_SEARCH_STEPS):
        if best[0] < _TOLERANCE:
            break
        strength = 0.5 * (low + high)
        if evaluate(strength) > goal:
            low = strength  # not corrupted enough yet
        else:
            high = strength
    return best[1], best[2]


def corrupt_with_dice(
    mask: np.ndarray, kind: str, rng: np.random.Generator, valid: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Corrupt a (square, refiner-space) boolean ``mask`` with ``kind``: (corrupted mask, its Dice).

    An empty ``mask`` (a normal image) cannot be corrupted towards a band: ``empty_prediction``
    keeps it empty (Dice 1), every other kind adds false-positive blobs (Dice 0).
    """
    if kind not in _FAMILIES:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTION_NAMES)}")
    mask = np.asarray(mask) > 0
    valid = np.ones(mask.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if not mask.any():
        if kind == "empty_prediction":
            return mask.copy(), 1.0
        return _blobs_on_empty(mask.shape, valid, rng), 0.0
    if kind == "empty_prediction":
        return np.zeros_like(mask), 0.0
    band = CORRUPTIONS[kind]
    lesion = _Lesion.of(mask, valid)
    family = _FAMILIES[kind](lesion, rng)
    margin = _BAND_MARGIN * (band[1] - band[0])
    goal = float(rng.uniform(band[0] + margin, band[1] - margin))
    return _search(family, mask, band, goal)


def corrupt(
    mask: np.ndarray, kind: str, rng: np.random.Generator, valid: np.ndarray | None = None
) -> np.ndarray:
    """Corrupted boolean mask of ``kind`` whose Dice against ``mask`` lies in ``CORRUPTIONS[kind]``."""
    return corrupt_with_dice(mask, kind, rng, valid)[0]


def _blobs_on_empty(shape: tuple[int, int], valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = min(shape)
    rows, cols = np.indices(shape)
    blobs = np.zeros(shape, dtype=bool)
    candidates = np.flatnonzero(valid)
    for _ in range(int(rng.integers(1, 3))):
        index = candidates[rng.integers(candidates.size)] if candidates.size else 0
        centre_r, centre_c = divmod(int(index), shape[1])
        radius = rng.uniform(0.02, 0.08) * side
        blobs |= (rows - centre_r) ** 2 + (cols - centre_c) ** 2 <= radius**2
    return blobs & valid


# --------------------------------------------------------------------------------------------
# Phase 2a entry point


def choose_kinds(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` corruption kinds covering all bands: consecutive seeded permutations of the 12 types."""
    kinds: list[str] = []
    while len(kinds) < n:
        kinds.extend(CORRUPTION_NAMES[k] for k in rng.permutation(len(CORRUPTION_NAMES)))
    return kinds[:n]


def augment_mask(
    mask: np.ndarray,
    n: int,
    rng: np.random.Generator,
    cfg: AugmentConfig | None = None,
    valid: np.ndarray | None = None,
    image_side: int | None = None,
) -> list[AugmentedMask]:
    """``n`` soft corrupted masks of one ground truth, at ``cfg.mask_size`` in refiner space.

    ``mask`` is the native ``H×W`` ground truth (mapped to refiner space with
    :class:`Geometry` with the refiner's ``image_side``, which also gives the valid region) or
    already a ``mask_size`` square (then ``valid`` may be given). Kinds follow
    :func:`choose_kinds`; each soft mask uses a temperature drawn uniformly from
    ``[temperature_min, temperature_max]``. Deterministic for a given ``rng`` state.
    """
    cfg = cfg or AugmentConfig()
    square, region = to_mask_space(mask, cfg.mask_size, image_side)
    if valid is not None:
        region = np.asarray(valid, dtype=bool)
    results = []
    for kind in choose_kinds(n, rng):
        corrupted, value = corrupt_with_dice(square, kind, rng, region)
        temperature = float(rng.uniform(cfg.temperature_min, cfg.temperature_max))
        results.append(AugmentedMask(kind, soft_mask(corrupted, temperature), value, temperature))
    return results
