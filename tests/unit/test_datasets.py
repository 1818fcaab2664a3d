from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import SHARED_DATA_ROOT
from training.data.datasets import (
    Sample,
    busbra_official_folds,
    list_samples,
    load_image,
    load_mask,
)

BUSI_ROOT = SHARED_DATA_ROOT / "BUSI"
BUSBRA_ROOT = SHARED_DATA_ROOT / "BUSBRA-sample"


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path)


def _gray(seed: int, shape=(40, 50)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _box(shape=(40, 50), y=(10, 20), x=(10, 25)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[y[0] : y[1], x[0] : x[1]] = 255
    return mask


# ------------------------------------------------------------------------------ synthetic trees


def test_busi_synthetic_union_and_roots(tmp_path):
    base = tmp_path / "BUSI" / "Dataset_BUSI_with_GT"
    _write(base / "benign" / "benign (1).png", _gray(1))
    _write(base / "benign" / "benign (1)_mask.png", _box(y=(0, 5)), "1")
    _write(base / "benign" / "benign (1)_mask_1.png", _box(y=(30, 35)), "1")
    _write(base / "benign" / "benign (2).png", _gray(2))
    _write(base / "benign" / "benign (2)_mask.png", _box(), "1")
    _write(base / "malignant" / "malignant (1).png", np.stack([_gray(3)] * 3, axis=-1))
    _write(base / "malignant" / "malignant (1)_mask.png", _box(), "1")
    _write(base / "normal" / "normal (1).png", _gray(4))
    _write(base / "normal" / "normal (1)_mask.png", np.zeros((40, 50), np.uint8), "1")
    _write(base / "normal" / "normal (2).png", _gray(5))  # no mask file: empty ground truth
    for root in (tmp_path / "BUSI", base):
        samples = list_samples("busi", root)
        assert [s.id for s in samples] == [
            "benign (1)",
            "benign (2)",
            "malignant (1)",
            "normal (1)",
            "normal (2)",
        ]
    first = samples[0]
    assert len(first.mask_paths) == 2
    mask = load_mask(first)
    assert mask.dtype == bool and mask.shape == (40, 50)
    assert mask.sum() == 2 * 5 * 15
    assert load_image(samples[2].image_path).shape == (40, 50, 3)
    assert not load_mask(samples[3]).any() and not load_mask(samples[4]).any()


def test_busi_missing_mask_and_bad_layout(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    for label in ("benign", "malignant", "normal"):
        (base / label).mkdir(parents=True)
    _write(base / "benign" / "benign (7).png", _gray(1))
    with pytest.raises(FileNotFoundError, match=r"benign \(7\)_mask\.png"):
        list_samples("busi", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a BUSI folder"):
        list_samples("busi", tmp_path / "Dataset_BUSI_with_GT" / "benign")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_samples("busi", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset"):
        list_samples("kvasir", tmp_path)


def test_mask_size_mismatch_names_the_file(tmp_path):
    _write(tmp_path / "img.png", _gray(0))
    _write(tmp_path / "m.png", _box(shape=(20, 20), y=(0, 5), x=(0, 5)))
    sample = Sample("x", tmp_path / "img.png", [tmp_path / "m.png"], "benign")
    with pytest.raises(ValueError, match="m.png"):
        load_mask(sample)
    missing = Sample("x", tmp_path / "img.png", [tmp_path / "gone.png"], "benign")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_mask(missing)


def _busbra_tree(root: Path) -> None:
    rows = ["ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"]
    for n, (case, side, path) in enumerate(
        [(3, "l", "benign"), (3, "r", "benign"), (8, "s", "malignant")], start=1
    ):
        image_id = f"bus_{case:04d}-{side}"
        _write(root / "Images" / f"{image_id}.png", _gray(n))
        _write(root / "Masks" / f"mask_{case:04d}-{side}.png", _box(), "1")
        rows.append(f'{image_id},{case},fibroadenoma,{path},4,dev,50,40,left,"[1,2,3,4]"')
    (root / "bus_data.csv").write_text("\n".join(rows) + "\n")


def test_busbra_synthetic(tmp_path):
    _busbra_tree(tmp_path)
    samples = list_samples("busbra", tmp_path)
    assert [s.id for s in samples] == ["bus_0003-l", "bus_0003-r", "bus_0008-s"]
    assert [s.group for s in samples] == ["case-3", "case-3", "case-8"]
    assert [s.label for s in samples] == ["benign", "benign", "malignant"]
    assert load_mask(samples[0]).sum() == 10 * 15
    assert busbra_official_folds(tmp_path) is None
    (tmp_path / "5-fold-cv.csv").write_text("ID,kFold\nbus_0003-l,1\nbus_0003-r,1\nbus_0008-s,2\n")
    assert busbra_official_folds(tmp_path) == {"bus_0003-l": 1, "bus_0003-r": 1, "bus_0008-s": 2}
    (tmp_path / "Masks" / "mask_0008-s.png").unlink()
    with pytest.raises(FileNotFoundError, match="mask_0008-s.png"):
        list_samples("busbra", tmp_path)
    (tmp_path / "bus_data.csv").unlink()
    with pytest.raises(FileNotFoundError, match="bus_data.csv"):
        list_samples("busbra", tmp_path)


def test_bus_dataset_b_synthetic(tmp_path):
    for n in (1, 2, 10):
        _write(tmp_path / "BUS" / "original" / f"{n:06d}.png", _gray(n))
        _write(tmp_path / "BUS" / "GT" / f"{n:06d}.png", _box())
    samples = list_samples("bus", tmp_path)
    assert [s.id for s in samples] == ["000001", "000002", "000010"]
    assert {s.label for s in samples} == {"lesion"}
    assert load_mask(samples[2]).sum() == 150
    (tmp_path / "BUS" / "GT" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002"):
        list_samples("bus", tmp_path / "BUS")


def test_bus_uc_synthetic(tmp_path):
    base = tmp_path / "BUS_UC" / "BUS_UC"
    for label, count in (("Benign", 2), ("Malignant", 1)):
        for n in range(1, count + 1):
            _write(base / label / "images" / f"{n:02d}.png", np.stack([_gray(n)] * 3, -1))
            _write(base / label / "masks" / f"{n:02d}.png", _box())
    samples = list_samples("bus_uc", tmp_path)
    assert [s.id for s in samples] == ["benign_01", "benign_02", "malignant_01"]
    assert Counter(s.label for s in samples) == {"benign": 2, "malignant": 1}
    assert load_mask(samples[0]).sum() == 150
    (base / "Malignant" / "masks").rename(base / "Malignant" / "labels")
    with pytest.raises(FileNotFoundError, match="Malignant"):
        list_samples("bus_uc", tmp_path)


def test_bus_uclm_colour_masks(tmp_path):
    base = tmp_path / "BUS-UCLM"
    colours = {"ALWI_000": (0, 255, 0), "ALWI_001": (255, 0, 0), "BEPA_000": None}
    for name, colour in colours.items():
        _write(base / "images" / f"{name}.png", _gray(len(name)))
        mask = np.zeros((40, 50, 3), np.uint8)
        if colour:
            mask[10:20, 10:25] = colour
        _write(base / "masks" / f"{name}.png", mask)
    samples = list_samples("bus_uclm", tmp_path)
    assert [(s.id, s.label, s.group) for s in samples] == [
        ("ALWI_000", "benign", "ALWI"),
        ("ALWI_001", "malignant", "ALWI"),
        ("BEPA_000", "normal", "BEPA"),
    ]
    assert load_mask(samples[0]).sum() == 150 and load_mask(samples[1]).sum() == 150
    assert not load_mask(samples[2]).any()


def test_load_image_dtypes(tmp_path):
    _write(tmp_path / "g.png", _gray(0))
    assert load_image(tmp_path / "g.png").dtype == np.uint8
    deep = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    loaded = load_image(tmp_path / "d.png")
    assert loaded.shape == (40, 50) and loaded.dtype == np.uint16 and int(loaded.max()) == int(deep.max())
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")


# ------------------------------------------------------------------------------ shipped data


@pytest.mark.skipif(not BUSI_ROOT.is_dir(), reason="shared BUSI data not present")
def test_busi_shared_counts_and_union():
    samples = list_samples("busi", BUSI_ROOT)
    assert len(samples) == 780
    assert Counter(s.label for s in samples) == {"benign": 437, "malignant": 210, "normal": 133}
    multi = [s for s in samples if len(s.mask_paths) > 1]
    assert len(multi) == 17
    assert Counter(s.label for s in multi) == {"benign": 16, "malignant": 1}
    grew = 0
    for union, parts in _unions(multi):
        assert np.array_equal(union, np.logical_or.reduce(parts))
        grew += int(union.sum() > max(p.sum() for p in parts))
    assert grew > 0
    image = load_image(multi[0].image_path)
    assert image.shape[:2] == load_mask(multi[0]).shape


def _single(sample: Sample, path: Path) -> np.ndarray:
    return load_mask(Sample(sample.id, sample.image_path, [path], sample.label))


def _unions(samples):
    for sample in samples:
        parts = [
            load_mask(Sample(sample.id, sample.image_path, [p], sample.label)) for p in sample.mask_paths
        ]
        yield load_mask(sample), parts


@pytest.mark.skipif(not BUSBRA_ROOT.is_dir(), reason="shared BUS-BRA sample not present")
def test_busbra_shared_sample():
    samples = list_samples("busbra", BUSBRA_ROOT)
    assert len(samples) == 12
    assert {s.label for s in samples} == {"benign", "malignant"}
    assert len({s.group for s in samples}) == 7
    for sample in samples:
        mask = load_mask(sample)
        assert mask.shape == load_image(sample.image_path).shape[:2] and mask.any()
