"""Readers for the public breast-ultrasound segmentation datasets, in their release layouts.

Every reader returns a list of :class:`Sample` (image path, mask paths, label, group hint);
:func:`load_image` and :func:`load_mask` read the pixels. Nothing is resized or normalised
here: the one preprocessing lives in :mod:`training.data.transforms`.

Supported layouts (``root`` is the folder the user downloaded and unpacked):

``busi``
    BUSI — W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, "Dataset of breast ultrasound images",
    Data in Brief 28 (2020) 104863. ``Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (<n>).png``
    with ``<class> (<n>)_mask.png`` and, for multifocal lesions, ``_mask_1.png``, ``_mask_2.png``…;
    the ground truth is the union of all masks; ``normal`` masks are empty. ``root`` may be the
    folder holding ``Dataset_BUSI_with_GT`` or ``Dataset_BUSI_with_GT`` itself. No patient ids.
``busbra``
    BUS-BRA — W. Gómez-Flores, M. J. Gregorio-Calas, W. C. de Albuquerque Pereira, "BUS-BRA: A
    Breast Ultrasound Dataset for Assessing Computer-aided Diagnosis Systems", Medical Physics
    51(4) (2024) 3110–3123. ``Images/bus_XXXX-{l,r,s}.png``, ``Masks/mask_XXXX-{l,r,s}.png``,
    ``bus_data.csv`` (``ID, Case, Histology, Pathology, …``). Label = ``Pathology``; group =
    ``Case`` (the patient), so both breasts of one patient stay in one split. The official
    ``5-fold-cv.csv`` / ``10-fold-cv.csv`` are optional extras (:func:`busbra_official_folds`).
``bus``
    Dataset B — M. H. Yap, G. Pons, J. Martí, S. Ganau, M. Sentís, R. Zwiggelaar, A. K. Davison,
    R. Martí, "Automated Breast Ultrasound Lesions Detection Using Convolutional Neural
    Networks", IEEE J. Biomed. Health Inform. 22(4) (2018) 1218–1226. ``original/*.png`` and
    ``GT/*.png`` with the same file names. The benign/malignant labels ship only in
    ``DatasetB.xlsx``, which is not read: every sample is labelled ``lesion``.
``bus_uc``
    BUS_UC — A. Iqbal, M. Sharif, "Memory-efficient transformer network with feature fusion for
    breast tumor segmentation and classification task", Eng. Appl. Artif. Intell. 127 (2024)
    107292; Mendeley Data doi:10.17632/3ksd7w7jkx. ``{Benign,Malignant}/images/*`` and
    ``{Benign,Malignant}/masks/*`` with matching file stems; the release nests this inside one
    or two ``BUS_UC`` folders, which are searched.
``bus_uclm``
    BUS-UCLM — N. Vallez, G. Bueno, O. Deniz, M. A. Rienda, C. Pastor, "BUS-UCLM: Breast
    ultrasound lesion segmentation dataset", Scientific Data 12 (2025) 242; Mendeley Data
    doi:10.17632/7fvgj4jsp7. ``images/<PATI>_<nnn>.png`` and ``masks/<same name>`` where the masks
    are RGB: black = normal tissue, green = benign lesion, red = malignant lesion. Label from the
    mask colours (red wins; no colour → ``normal``); group = the 4-letter scan prefix.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DATASETS = ("busi", "busbra", "bus", "bus_uc", "bus_uclm", "corrections")


@dataclass
class Sample:
    """One image and its ground truth.

    ``mask_paths`` may hold several files (their union is the ground truth) or none (an image
    known to be lesion-free, e.g. a BUSI ``normal`` image without a mask file). ``group`` is the
    patient/scan id when the dataset provides one (``None`` otherwise); splits never separate
    samples of one group.
    """

    id: str
    image_path: Path
    mask_paths: list[Path]
    label: str
    group: str | None = None
    dataset: str = ""
    #: ``"binary"``: foreground = bright pixels; ``"rgb"``: foreground = any coloured pixel.
    mask_encoding: str = "binary"
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Pixels


def load_image(path: Path | str) -> np.ndarray:
    """Read an image as stored: gray ``H×W`` (uint8, or uint16 for 16-bit files) or RGB ``H×W×3``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("1", "L", "LA"):
                array = np.asarray(image.convert("L"))
            elif mode == "P":
                rgb = np.asarray(image.convert("RGB"))
                array = rgb[..., 0] if _channels_equal(rgb) else rgb
            elif mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image)
                array = array.astype(np.uint16) if array.max(initial=0) <= 65535 else array
            elif mode == "F":
                array = np.asarray(image)
            else:
                array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return np.ascontiguousarray(array)


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _read_mask_file(path: Path, encoding: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                return np.asarray(image, dtype=bool).copy()
            if image.mode == "P":
                image = image.convert("RGB")
            if image.mode in ("LA", "RGBA"):
                image = image.convert(image.mode[:-1])
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    if array.ndim == 3:
        # RGB masks (BUS-UCLM colour codes, or gray masks saved as RGB): any lit channel.
        array = array[..., :3].max(axis=2)
    peak = float(array.max(initial=0))
    if peak <= 1:  # masks stored as {0, 1}
        return array > 0
    if encoding == "rgb":
        return array > 0.25 * (255 if array.dtype == np.uint8 else peak)
    full_scale = 255 if array.dtype == np.uint8 else (65535 if array.dtype == np.uint16 else peak)
    return array > 0.5 * full_scale


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as error:
        raise FileNotFoundError(f"image file not found: {path}") from error
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return height, width


def load_mask(sample: Sample) -> np.ndarray:
    """Ground truth of ``sample``: ``H×W`` bool, the union of all its mask files (empty if none)."""
    height, width = image_size(sample.image_path)
    union = np.zeros((height, width), dtype=bool)
    for path in sample.mask_paths:
        mask = _read_mask_file(Path(path), sample.mask_encoding)
        if mask.shape != union.shape:
            raise ValueError(
                f"mask {path} is {mask.shape[1]}×{mask.shape[0]} but its image {sample.image_path} "
                f"is {width}×{height}"
            )
        union |= mask
    return union


# --------------------------------------------------------------------------------------------
# Layouts


def list_samples(dataset: str, root: Path | str) -> list[Sample]:
    """All samples of ``dataset`` (one of :data:`DATASETS`) under ``root``, in a stable order."""
    readers: dict[str, Callable[[Path], list[Sample]]] = {
        "busi": _list_busi,
        "busbra": _list_busbra,
        "bus": _list_bus,
        "bus_uc": _list_bus_uc,
        "bus_uclm": _list_bus_uclm,
        "corrections": _list_corrections,
    }
    if dataset not in readers:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} root folder not found: {root}")
    samples = readers[dataset](root)
    if not samples:
        raise ValueError(f"no {dataset} images found under {root}")
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate sample ids in {dataset} under {root}")
    return samples


#: Separates a pooled dataset's name from its own image id (``corrections:ab12…``).
POOL_SEPARATOR = ":"


def list_pool_samples(dataset: str, root: Path | str) -> list[Sample]:
    """The samples of a run's pooled (second) dataset: :func:`list_samples` with every id
    prefixed ``<dataset>:`` (ids of two datasets never collide) and ``extra["pool"]`` set."""
    import dataclasses

    return [
        dataclasses.replace(
            sample, id=f"{dataset}{POOL_SEPARATOR}{sample.id}", extra={**sample.extra, "pool": True}
        )
        for sample in list_samples(dataset, root)
    ]


def is_pool_sample(sample: Sample) -> bool:
    return bool(sample.extra.get("pool"))


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _child(folder: Path, name: str) -> Path | None:
    """Case-insensitive lookup of a direct sub-folder."""
    exact = folder / name
    if exact.is_dir():
        return exact
    for child in folder.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def _find_root(root: Path, required: tuple[str, ...], depth: int = 2) -> Path | None:
    """``root`` or the first sub-folder (breadth-first, ``depth`` levels) holding all ``required``."""
    level = [root]
    for _ in range(depth + 1):
        next_level: list[Path] = []
        for folder in level:
            if all(_child(folder, name) is not None for name in required):
                return folder
            next_level.extend(sorted(p for p in folder.iterdir() if p.is_dir()))
        level = next_level
    return None


def _match_by_stem(images: list[Path], mask_dir: Path, suffixes=("", "_mask", "_GT", "_gt", "-mask")):
    """Map each image to the mask file in ``mask_dir`` with the same stem (+ an optional suffix)."""
    masks = {p.stem: p for p in _images_in(mask_dir)}
    matched: dict[Path, Path] = {}
    for image in images:
        for suffix in suffixes:
            mask = masks.get(image.stem + suffix)
            if mask is not None:
                matched[image] = mask
                break
        else:
            raise FileNotFoundError(f"no mask for image {image} in {mask_dir} (expected {image.stem}.png)")
    return matched


_BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(?:_(\d+))?)?$", re.IGNORECASE)


def _list_busi(root: Path) -> list[Sample]:
    base = root
    if not all((base / c).is_dir() for c in _BUSI_CLASSES):
        base = root / "Dataset_BUSI_with_GT"
    if not all((base / c).is_dir() for c in _BUSI_CLASSES):
        raise FileNotFoundError(
            f"not a BUSI folder: {root} (expected Dataset_BUSI_with_GT/{{benign,malignant,normal}}/ "
            "or {benign,malignant,normal}/ inside it)"
        )
    samples: list[Sample] = []
    for label in _BUSI_CLASSES:
        folder = base / label
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in folder.iterdir():
            if not path.is_file() or path.suffix.lower() != ".png":
                continue
            match = _BUSI_NAME.match(path.stem)
            if match is None:
                continue  # stray files (e.g. thumbnails) are not part of the release
            stem = f"{match.group(1).lower()} ({int(match.group(2))})"
            if match.group(3):
                order = int(match.group(4)) if match.group(4) else 0
                masks.setdefault(stem, []).append((order, path))
            else:
                images[stem] = path
        for stem in masks:
            if stem not in images:
                raise ValueError(f"BUSI mask without its image: {masks[stem][0][1]}")
        for stem in sorted(images, key=_natural_key):
            mask_paths = [p for _, p in sorted(masks.get(stem, []))]
            if not mask_paths and label != "normal":
                raise FileNotFoundError(
                    f"BUSI mask missing for {images[stem]} (expected {folder / (stem + '_mask.png')})"
                )
            samples.append(Sample(stem, images[stem], mask_paths, label, None, "busi"))
    return samples


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


def _list_busbra(root: Path) -> list[Sample]:
    base = _find_root(root, ("Images", "Masks"), depth=1)
    if base is None:
        raise FileNotFoundError(f"not a BUS-BRA folder: {root} (expected Images/, Masks/ and bus_data.csv)")
    table = base / "bus_data.csv"
    if not table.is_file():
        raise FileNotFoundError(f"BUS-BRA table missing: {table}")
    rows = _read_csv_rows(table)
    if not rows or not {"ID", "Case", "Pathology"} <= set(rows[0]):
        raise ValueError(f"BUS-BRA table {table} lacks the columns ID, Case, Pathology")
    image_dir, mask_dir = _child(base, "Images"), _child(base, "Masks")
    samples = []
    for row in rows:
        image_id = row["ID"]
        image = image_dir / f"{image_id}.png"
        mask = mask_dir / f"{re.sub(r'^bus_', 'mask_', image_id)}.png"
        if not image.is_file():
            raise FileNotFoundError(f"BUS-BRA image listed in {table} not found: {image}")
        if not mask.is_file():
            raise FileNotFoundError(f"BUS-BRA mask missing for {image}: {mask}")
        extra = {k: row[k] for k in ("Histology", "BIRADS", "Device", "Side") if k in row}
        samples.append(
            Sample(
                image_id,
                image,
                [mask],
                row["Pathology"].lower(),
                f"case-{row['Case']}",
                "busbra",
                "binary",
                extra,
            )
        )
    return sorted(samples, key=lambda s: _natural_key(s.id))


def busbra_official_folds(root: Path | str, folds: int = 5) -> dict[str, int] | None:
    """The official ``<folds>-fold-cv.csv`` of BUS-BRA as ``{image id: fold}``, or ``None`` if absent.

    Informational only: our own split (:mod:`training.data.splits`) is used for training.
    """
    base = _find_root(Path(root), ("Images", "Masks"), depth=1) or Path(root)
    path = base / f"{folds}-fold-cv.csv"
    if not path.is_file():
        return None
    rows = _read_csv_rows(path)
    if not rows:
        return None
    columns = list(rows[0])
    id_column = next((c for c in columns if c.lower() == "id"), columns[0])
    fold_column = next((c for c in columns if "fold" in c.lower() and c != id_column), None)
    if fold_column is None:
        fold_column = next(c for c in columns if c != id_column)
    result = {}
    for row in rows:
        try:
            result[row[id_column]] = int(float(row[fold_column]))
        except ValueError:
            continue
    return result


def _list_bus(root: Path) -> list[Sample]:
    base = _find_root(root, ("original", "GT"), depth=2)
    if base is None:
        raise FileNotFoundError(f"not a BUS (Dataset B) folder: {root} (expected original/ and GT/)")
    images = _images_in(_child(base, "original"))
    matched = _match_by_stem(images, _child(base, "GT"))
    return [Sample(image.stem, image, [matched[image]], "lesion", None, "bus") for image in images]


def _list_corrections(root: Path) -> list[Sample]:
    """Masks saved from the admin UI or ``POST /api/corrections`` (``backend/app/corrections.py``):
    ``images/<key>.png``, ``masks/<key>.png`` and ``meta/<key>.json``; a pair counts once its meta
    file exists (written last). Frames of one DICOM instance share a group (the hash of its
    SOPInstanceUID), so a split never separates them."""
    import json

    meta_dir = root / "meta"
    if not meta_dir.is_dir():
        raise FileNotFoundError(f"not a corrections folder: {root} (expected meta/, images/, masks/)")
    samples = []
    for meta_path in sorted(meta_dir.glob("*.json"), key=lambda p: p.name):
        image, mask = root / "images" / f"{meta_path.stem}.png", root / "masks" / f"{meta_path.stem}.png"
        if not (image.is_file() and mask.is_file()):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        label = "lesion" if int(meta.get("lesion_px") or 0) > 0 else "normal"
        group = meta.get("sop_instance_uid_sha256") or None
        samples.append(
            Sample(meta_path.stem, image, [mask], label, group, "corrections", extra={"meta": meta})
        )
    return samples


def _list_bus_uc(root: Path) -> list[Sample]:
    base = _find_root(root, ("Benign", "Malignant"), depth=2)
    if base is None:
        raise FileNotFoundError(f"not a BUS_UC folder: {root} (expected Benign/ and Malignant/)")
    samples = []
    for label in ("benign", "malignant"):
        class_dir = _child(base, label)
        image_dir, mask_dir = _child(class_dir, "images"), _child(class_dir, "masks")
        if image_dir is None or mask_dir is None:
            raise FileNotFoundError(f"BUS_UC class folder {class_dir} lacks images/ or masks/")
        images = _images_in(image_dir)
        matched = _match_by_stem(images, mask_dir)
        samples.extend(
            Sample(f"{label}_{image.stem}", image, [matched[image]], label, None, "bus_uc")
            for image in images
        )
    return samples


def _uclm_label(mask_path: Path) -> str:
    with Image.open(mask_path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int16)
    red = (rgb[..., 0] > 127) & (rgb[..., 0] - rgb[..., 1] > 64)
    green = (rgb[..., 1] > 127) & (rgb[..., 1] - rgb[..., 0] > 64)
    if red.any():
        return "malignant"
    return "benign" if green.any() else "normal"


def _list_bus_uclm(root: Path) -> list[Sample]:
    base = _find_root(root, ("images", "masks"), depth=2)
    if base is None:
        raise FileNotFoundError(f"not a BUS-UCLM folder: {root} (expected images/ and masks/)")
    images = _images_in(_child(base, "images"))
    matched = _match_by_stem(images, _child(base, "masks"))
    samples = []
    for image in images:
        group = image.stem.split("_")[0] if "_" in image.stem else None
        label = _uclm_label(matched[image])
        samples.append(Sample(image.stem, image, [matched[image]], label, group, "bus_uclm", "rgb"))
    return samples
