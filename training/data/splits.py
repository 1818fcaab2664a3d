"""Duplicate-aware, label-stratified, seeded train/test split and K folds.

Public ultrasound datasets contain exact and near-duplicate frames (BUSI: at least
``benign (433).png`` = ``malignant (145).png``, and many near-identical frames of one lesion).
Evaluating on a duplicate of a training image inflates Dice, so samples are first grouped:

* exact duplicates — identical gray pixel content (sha256 of the gray pixels and shape);
* near duplicates — the mean Hamming distance of two 64-bit perceptual hashes (pHash and
  dHash of a min-max normalised gray thumbnail) is at most ``threshold`` bits;
* patient ids — samples with the same :attr:`Sample.group` (e.g. a BUS-BRA ``Case``).

Pairs are merged with union-find. Groups are then assigned whole: a held-out test split of
about ``test_fraction`` of the images, and ``folds`` cross-validation folds on the rest, both
stratified by label (greedy: largest group first, into the bin whose per-label counts are
furthest below their targets; ties broken by the seed). The result is written to a JSON split
file so that every run and report uses exactly the same images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from training.data.datasets import Sample, load_image
from training.data.transforms import min_max, to_gray

log = logging.getLogger(__name__)

SPLIT_FORMAT = "ultrarefiner-split"
SPLIT_VERSION = 1
_THUMBNAIL = 128


# --------------------------------------------------------------------------------------------
# Duplicate grouping


@dataclass(frozen=True)
class ImageHashes:
    """Fingerprints of one image: exact-content digest and two 64-bit perceptual hashes."""

    content: str
    phash: int
    dhash: int


def _hash_int(image_hash: imagehash.ImageHash) -> int:
    return int("".join("1" if bit else "0" for bit in image_hash.hash.flatten()), 2)


def hash_image(image: np.ndarray) -> ImageHashes:
    """Fingerprint one native image (gray or colour, any dtype)."""
    gray = to_gray(image)
    content = hashlib.sha256(np.ascontiguousarray(gray).tobytes() + str(gray.shape).encode()).hexdigest()
    normalised = (min_max(gray) * 255.0 + 0.5).astype(np.uint8)
    thumbnail = Image.fromarray(normalised).resize((_THUMBNAIL, _THUMBNAIL), Image.Resampling.BILINEAR)
    return ImageHashes(content, _hash_int(imagehash.phash(thumbnail)), _hash_int(imagehash.dhash(thumbnail)))


def hash_samples(samples: Sequence[Sample]) -> list[ImageHashes]:
    """Fingerprints of every sample's image (≈3 ms an image on one core, mostly PNG decoding)."""
    return [hash_image(load_image(sample.image_path)) for sample in samples]


def _hamming_matrix(values: Sequence[int], others: Sequence[int] | None = None) -> np.ndarray:
    """Bit distances between 64-bit hashes: ``values`` × ``others`` (× themselves by default)."""
    array = np.array(values, dtype=np.uint64)
    other = array if others is None else np.array(others, dtype=np.uint64)
    return np.bitwise_count(array[:, None] ^ other[None, :]).astype(np.int16)


def _near(d_phash: np.ndarray, d_dhash: np.ndarray, threshold: int) -> np.ndarray:
    """The near-duplicate rule: mean of the two hash distances at most ``threshold`` bits."""
    return d_phash + d_dhash <= 2 * threshold


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


@dataclass
class DuplicateReport:
    """Groups (one id per sample, numbered in order of first appearance) and why they merged."""

    groups: list[int]
    exact_pairs: list[tuple[int, int]] = field(default_factory=list)
    near_pairs: list[tuple[int, int, int, int]] = field(default_factory=list)  # i, j, d_phash, d_dhash
    patient_links: int = 0

    @property
    def n_groups(self) -> int:
        return len(set(self.groups))

    @property
    def n_in_multi_groups(self) -> int:
        sizes = Counter(self.groups)
        return sum(size for size in sizes.values() if size > 1)

    def summary(self) -> dict:
        sizes = Counter(self.groups)
        return {
            "n_samples": len(self.groups),
            "n_groups": self.n_groups,
            "n_multi_groups": sum(1 for size in sizes.values() if size > 1),
            "n_samples_in_multi_groups": self.n_in_multi_groups,
            "largest_group": max(sizes.values(), default=0),
            "exact_pairs": len(self.exact_pairs),
            "near_pairs": len(self.near_pairs),
        }


def find_duplicates(
    samples: Sequence[Sample], threshold: int, hashes: Sequence[ImageHashes] | None = None
) -> DuplicateReport:
    """Union-find over exact duplicates, near duplicates and patients.

    Near duplicates: ``(d_phash + d_dhash) / 2 ≤ threshold``. Measured on BUSI (780 images):
    unrelated pairs have a median distance of ~31 bits; visually checked pairs up to a mean of
    ~14 bits are the same lesion (re-saved, re-cropped or re-annotated frames), and false
    matches start around 15 bits.
    """
    hashes = list(hashes) if hashes is not None else hash_samples(samples)
    if len(hashes) != len(samples):
        raise ValueError("one hash per sample is required")
    n = len(samples)
    union = _UnionFind(n)
    exact_pairs: list[tuple[int, int]] = []
    first_by_content: dict[str, int] = {}
    for index, item in enumerate(hashes):
        if item.content in first_by_content:
            exact_pairs.append((first_by_content[item.content], index))
            union.union(first_by_content[item.content], index)
        else:
            first_by_content[item.content] = index
    near_pairs: list[tuple[int, int, int, int]] = []
    if n > 1:
        d_phash = _hamming_matrix([h.phash for h in hashes])
        d_dhash = _hamming_matrix([h.dhash for h in hashes])
        close = np.triu(_near(d_phash, d_dhash, threshold), k=1)
        for i, j in zip(*np.nonzero(close), strict=True):
            near_pairs.append((int(i), int(j), int(d_phash[i, j]), int(d_dhash[i, j])))
            union.union(int(i), int(j))
    patient_links = 0
    first_by_patient: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.group is None:
            continue
        if sample.group in first_by_patient:
            union.union(first_by_patient[sample.group], index)
            patient_links += 1
        else:
            first_by_patient[sample.group] = index
    numbering: dict[int, int] = {}
    groups = [numbering.setdefault(union.find(i), len(numbering)) for i in range(n)]
    return DuplicateReport(groups, exact_pairs, near_pairs, patient_links)


def duplicates_of(samples: Sequence[Sample], references: Sequence[Sample], threshold: int) -> list[bool]:
    """For each of ``samples``, whether its image is an exact or near duplicate (the rule of
    :func:`find_duplicates`) of any image in ``references`` — e.g. the same frame saved as a
    correction under another id. Patients are not linked: the two lists may come from different
    datasets, whose group names mean different things."""
    if not samples or not references:
        return [False] * len(samples)
    mine, theirs = hash_samples(samples), hash_samples(references)
    contents = {h.content for h in theirs}
    d_phash = _hamming_matrix([h.phash for h in mine], [h.phash for h in theirs])
    d_dhash = _hamming_matrix([h.dhash for h in mine], [h.dhash for h in theirs])
    near = _near(d_phash, d_dhash, threshold).any(axis=1)
    return [item.content in contents or bool(close) for item, close in zip(mine, near, strict=True)]


def group_duplicates(samples: Sequence[Sample], threshold: int) -> list[int]:
    """Group id per sample (near duplicates, exact duplicates and patients share a group)."""
    return find_duplicates(samples, threshold).groups


# --------------------------------------------------------------------------------------------
# Stratified group assignment


def _assign_groups(
    group_counts: dict[int, np.ndarray], targets: np.ndarray, rng: np.random.Generator
) -> dict[int, int]:
    """Greedy stratified bin packing of groups. ``targets``: bins × labels wanted counts."""
    group_ids = list(group_counts)
    order = rng.permutation(len(group_ids))
    # Largest groups first (they are the hardest to place); the seeded permutation breaks ties.
    ranked = sorted(range(len(group_ids)), key=lambda k: (-int(group_counts[group_ids[k]].sum()), order[k]))
    filled = np.zeros_like(targets, dtype=np.float64)
    assignment: dict[int, int] = {}
    for k in ranked:
        counts = group_counts[group_ids[k]]
        # Increase of Σ (filled − target)² when the group joins each bin.
        deficit = filled - targets
        cost = (counts[None, :] * (counts[None, :] + 2.0 * deficit)).sum(axis=1)
        # Among equally good bins prefer the emptiest relative to its size, then a seeded choice.
        fullness = filled.sum(axis=1) / np.maximum(targets.sum(axis=1), 1e-9)
        tie_break = rng.random(len(cost)) * 1e-9
        best = int(np.lexsort((tie_break, fullness, np.round(cost, 9)))[0])
        filled[best] += counts
        assignment[group_ids[k]] = best
    return assignment


def _samples_of(ids: Sequence[str], samples: Sequence[Sample], what: str, source: str) -> list[Sample]:
    known = {sample.id for sample in samples}
    missing = [sample_id for sample_id in ids if sample_id not in known]
    if missing:
        raise ValueError(
            f"the split names {len(missing)} {what} images not in {source} "
            f"(e.g. {missing[0]!r}): another dataset or root?"
        )
    wanted = set(ids)
    return [sample for sample in samples if sample.id in wanted]


@dataclass
class Split:
    """A reproducible split: held-out ``test_ids`` and K validation folds on the rest."""

    dataset: str
    seed: int
    params: dict
    ids: list[str]
    labels: dict[str, str]
    groups: dict[str, int]
    test_ids: list[str]
    folds: list[list[str]]
    version: int = SPLIT_VERSION

    @property
    def trainval_ids(self) -> list[str]:
        test = set(self.test_ids)
        return [i for i in self.ids if i not in test]

    def val_ids(self, fold: int) -> list[str]:
        if not 0 <= fold < len(self.folds):
            raise IndexError(f"fold {fold} out of range (split has {len(self.folds)} folds)")
        return list(self.folds[fold])

    def train_ids(self, fold: int) -> list[str]:
        val = set(self.val_ids(fold))
        return [i for i in self.trainval_ids if i not in val]

    def test_samples(self, samples: Sequence[Sample], source: str = "the dataset") -> list[Sample]:
        """The held-out test samples among ``samples`` (dataset order); a clear error when the
        split names test images that ``samples`` lack (another dataset, root or version)."""
        return _samples_of(self.test_ids, samples, "test", source)

    def val_samples(self, fold: int, samples: Sequence[Sample], source: str = "the dataset") -> list[Sample]:
        """The validation samples of ``fold`` among ``samples`` (dataset order), like :meth:`test_samples`."""
        return _samples_of(self.val_ids(fold), samples, f"fold-{fold} validation", source)

    def counts(self) -> dict:
        def by_label(ids: Sequence[str]) -> dict[str, int]:
            return dict(sorted(Counter(self.labels[i] for i in ids).items()))

        return {
            "total": len(self.ids),
            "groups": len(set(self.groups.values())),
            "test": len(self.test_ids),
            "trainval": len(self.ids) - len(self.test_ids),
            "test_by_label": by_label(self.test_ids),
            "trainval_by_label": by_label(self.trainval_ids),
            "folds": [len(fold) for fold in self.folds],
            "folds_by_label": [by_label(fold) for fold in self.folds],
        }

    def matches(self, samples: Sequence[Sample], dataset: str | None = None) -> bool:
        """Same dataset (if given) and exactly the same sample ids."""
        if dataset is not None and dataset != self.dataset:
            return False
        return sorted(s.id for s in samples) == sorted(self.ids)

    def to_dict(self) -> dict:
        return {
            "format": SPLIT_FORMAT,
            "version": self.version,
            "dataset": self.dataset,
            "seed": self.seed,
            "params": self.params,
            "counts": self.counts(),
            "ids": self.ids,
            "labels": self.labels,
            "groups": self.groups,
            "test_ids": self.test_ids,
            "folds": self.folds,
        }

    def save(self, path: Path | str) -> Path:
        """Write the split as JSON atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(self.to_dict(), file, indent=1)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path | str) -> Split:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"split file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"split file {path} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
            raise ValueError(f"{path} is not an UltraRefiner split file")
        if data.get("version") != SPLIT_VERSION:
            raise ValueError(f"split file {path} has version {data.get('version')}, expected {SPLIT_VERSION}")
        try:
            split = cls(
                dataset=data["dataset"],
                seed=int(data["seed"]),
                params=dict(data["params"]),
                ids=list(data["ids"]),
                labels=dict(data["labels"]),
                groups={k: int(v) for k, v in data["groups"].items()},
                test_ids=list(data["test_ids"]),
                folds=[list(fold) for fold in data["folds"]],
                version=int(data["version"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"split file {path} is malformed: {error}") from error
        everything = set(split.test_ids).union(*map(set, split.folds)) if split.folds else set(split.test_ids)
        if everything != set(split.ids) or sum(map(len, split.folds)) + len(split.test_ids) != len(split.ids):
            raise ValueError(f"split file {path} is inconsistent: test + folds must partition the ids")
        return split


def make_split(
    samples: Sequence[Sample],
    test_fraction: float,
    folds: int,
    seed: int,
    threshold: int,
    *,
    dataset: str | None = None,
    groups: Sequence[int] | None = None,
) -> Split:
    """Group duplicates, hold out a stratified test split by group, then K stratified group folds.

    ``groups`` (one id per sample) skips the hashing when already computed.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    groups = list(groups) if groups is not None else group_duplicates(samples, threshold)
    label_names = sorted({s.label for s in samples})
    label_index = {name: k for k, name in enumerate(label_names)}
    n_groups = len(set(groups))
    if n_groups < folds + 1:
        raise ValueError(f"{n_groups} duplicate groups cannot fill a test split and {folds} folds")

    group_counts: dict[int, np.ndarray] = {}
    for sample, group in zip(samples, groups, strict=True):
        group_counts.setdefault(group, np.zeros(len(label_names)))[label_index[sample.label]] += 1
    totals = sum(group_counts.values())
    rng = np.random.default_rng(seed)

    test_targets = np.stack([totals * test_fraction, totals * (1 - test_fraction)])
    in_test = _assign_groups(group_counts, test_targets, rng)
    trainval_counts = {g: c for g, c in group_counts.items() if in_test[g] == 1}
    trainval_totals = sum(trainval_counts.values())
    fold_of = _assign_groups(trainval_counts, np.stack([trainval_totals / folds] * folds), rng)

    test_ids = [i for i, g in zip(ids, groups, strict=True) if in_test[g] == 0]
    fold_ids = [[i for i, g in zip(ids, groups, strict=True) if fold_of.get(g) == k] for k in range(folds)]
    if any(not fold for fold in fold_ids) or not test_ids:
        raise ValueError("too few groups for the requested split: an empty test split or fold")
    return Split(
        dataset=dataset or (samples[0].dataset if samples else ""),
        seed=seed,
        params={"test_fraction": test_fraction, "folds": folds, "dedup_threshold": threshold},
        ids=ids,
        labels={s.id: s.label for s in samples},
        groups=dict(zip(ids, groups, strict=True)),
        test_ids=test_ids,
        folds=fold_ids,
    )


def seeded_split(samples: Sequence[Sample], data, dataset: str | None = None) -> Split:
    """:func:`make_split` with the test fraction, folds, seed and duplicate threshold of a
    ``DataConfig`` (``dataset``: the name stored in the split, default ``data.dataset``)."""
    return make_split(
        samples,
        data.test_fraction,
        data.folds,
        data.seed,
        data.dedup_threshold,
        dataset=dataset or data.dataset,
    )


def pool_splits(first: Split, second: Split, dataset: str) -> Split:
    """One split of two datasets split on their own: ids, labels and groups side by side (the
    second's groups renumbered after the first's), test = both tests, fold k = both folds k."""
    if len(first.folds) != len(second.folds):
        raise ValueError(f"cannot pool a {len(first.folds)}-fold split with a {len(second.folds)}-fold one")
    overlap = set(first.ids) & set(second.ids)
    if overlap:
        raise ValueError(f"pooled datasets share {len(overlap)} image ids (e.g. {sorted(overlap)[0]!r})")
    offset = max(first.groups.values(), default=-1) + 1
    return Split(
        dataset=dataset,
        seed=first.seed,
        params={**first.params, "pooled": {"first": first.dataset, "second": second.dataset}},
        ids=first.ids + second.ids,
        labels={**first.labels, **second.labels},
        groups={**first.groups, **{k: v + offset for k, v in second.groups.items()}},
        test_ids=first.test_ids + second.test_ids,
        folds=[a + b for a, b in zip(first.folds, second.folds, strict=True)],
    )


def _pooled_split_for(cfg, samples: Sequence[Sample]) -> Split:
    """The split of a pooled run (``data.pool_dataset``): the first dataset's split (its
    ``split_file`` when given, as the fixed protocol; else seeded), the pooled dataset split on
    its own with the same test fraction, number of folds, seed and duplicate threshold, then
    :func:`pool_splits`; written to ``<output_dir>/split.json``."""
    from training.data.datasets import is_pool_sample

    data = cfg.data
    first_samples = [s for s in samples if not is_pool_sample(s)]
    second_samples = [s for s in samples if is_pool_sample(s)]
    if data.split_file is not None:
        first = Split.load(data.split_file)
        if not first.matches(first_samples, data.dataset):
            raise ValueError(
                f"split file {data.split_file} was made for other images ({first.dataset}, "
                f"{len(first.ids)} ids) than the {data.dataset} data at {data.root} "
                f"({len(first_samples)} ids)"
            )
    else:
        first = seeded_split(first_samples, data)
    try:
        second = make_split(
            second_samples,
            float(first.params.get("test_fraction", data.test_fraction)),
            len(first.folds),
            data.seed,
            data.dedup_threshold,
            dataset=data.pool_dataset,
        )
    except ValueError as error:
        raise ValueError(
            f"the pooled {data.pool_dataset} data at {data.pool_root} ({len(second_samples)} images) "
            f"cannot be split like {data.dataset}: {error}"
        ) from None
    split = pool_splits(first, second, data.name)
    split.save(cfg.split_path)
    return split


def split_for(cfg, samples: Sequence[Sample]) -> Split:
    """The split of a run: ``cfg.split_path`` if it fits ``samples`` and ``cfg.data``, else a new one.

    A split file named explicitly (``data.split_file``) is the user's fixed protocol: it is used
    whenever it holds the same dataset and ids (its own seed/folds win), and an error is raised
    rather than overwriting it when it does not. The default ``<output_dir>/split.json`` is
    rewritten whenever the dataset, ids, seed, folds, test fraction or threshold changed.
    """
    data = cfg.data
    if data.pooled:
        return _pooled_split_for(cfg, samples)
    path = Path(cfg.split_path)
    wanted = {
        "test_fraction": data.test_fraction,
        "folds": data.folds,
        "dedup_threshold": data.dedup_threshold,
    }
    if path.is_file():
        existing = Split.load(path)
        same_ids = existing.matches(samples, data.dataset)
        if data.split_file is not None:
            if not same_ids:
                raise ValueError(
                    f"split file {path} was made for other images ({existing.dataset}, "
                    f"{len(existing.ids)} ids) than the {data.dataset} data at {data.root} "
                    f"({len(samples)} ids)"
                )
            if existing.seed != data.seed or existing.params != wanted:
                log.warning("using split file %s as given (its seed/params differ from the config)", path)
            return existing
        if same_ids and existing.seed == data.seed and existing.params == wanted:
            return existing
        log.warning("split file %s does not match the data or config: making a new split", path)
    split = seeded_split(samples, data)
    split.save(path)
    return split
