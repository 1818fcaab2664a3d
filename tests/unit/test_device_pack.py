"""The GPU transfer of issue 16's probe: only one fold's training and validation images travel,
reduced, and come back as a BUSI tree the loader reads, masks aligned with their images."""

import importlib.util
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split

_SPEC = importlib.util.spec_from_file_location(
    "pack_coarse_probe", Path(__file__).resolve().parents[2] / "scripts" / "device" / "pack_coarse_probe.py"
)
pack = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pack)


def _busi_tree(root: Path, count: int = 4) -> None:
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant", "normal"):
        folder = root / "Dataset_BUSI_with_GT" / label
        folder.mkdir(parents=True)
        for n in range(1, count + 1):
            image = rng.integers(0, 255, (300, 500), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{label} ({n}).png")
            mask = np.zeros((300, 500), dtype=bool)
            if label != "normal":
                mask[100:200, 150 + 20 * n : 300 + 20 * n] = True
            Image.fromarray(mask).save(folder / f"{label} ({n})_mask.png")
            if label == "benign" and n == 1:  # a second mask: the ground truth is the union
                extra = np.zeros_like(mask)
                extra[20:40, 20:60] = True
                Image.fromarray(extra).save(folder / f"{label} ({n})_mask_1.png")


def test_only_the_folds_images_travel_and_come_back_aligned(tmp_path):
    _busi_tree(tmp_path / "src")
    samples = list_samples("busi", tmp_path / "src")
    ids = [s.id for s in samples]
    labels = {s.id: s.label for s in samples}
    groups = {i: k for k, i in enumerate(ids)}
    split = Split("busi", 0, {}, ids, labels, groups, test_ids=ids[:3], folds=[ids[3:7], ids[7:]])
    split_file = split.save(tmp_path / "split.json")
    archive = tmp_path / "busi.tar"
    count = pack.pack_busi(archive, tmp_path / "src", split_file, fold=0, max_side=250, quality=85)
    assert count == len(ids) - 3
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not any(f"/{test_id}." in name or f"/{test_id}_" in name for test_id in ids[:3] for name in names)

    assert pack.unpack_busi(archive, tmp_path / "dst" / "BUSI") == count
    back = {s.id: s for s in list_samples("busi", tmp_path / "dst" / "BUSI")}
    assert sorted(back) == sorted(ids[3:])
    originals = {s.id: s for s in samples}
    for sample_id, sample in back.items():
        image, mask = load_image(sample.image_path), load_mask(sample) > 0
        assert image.shape == (150, 250) and mask.shape == image.shape  # longest side 250, gray kept
        truth = load_mask(originals[sample_id]) > 0
        reduced = np.asarray(Image.fromarray(truth).resize((250, 150), Image.Resampling.NEAREST))
        assert (mask == reduced).mean() > 0.99  # the union of the masks, resized like the image
        assert abs(float(image.mean()) - float(load_image(originals[sample_id].image_path).mean())) < 3


def test_the_packed_encoder_restores_to_a_checkpoint_the_refiner_loads(tmp_path):
    # What travels is the pretrained image encoder in fp16 and the package without its checkpoint;
    # restored there with the shipped bundle's decoder, it must load under the refiner's strict
    # key check, with the encoder equal to the package's up to fp16 rounding.
    import torch

    from training.config import RefinerConfig
    from training.modeling.refiner import build_refiner

    spec = importlib.util.spec_from_file_location(
        "restore_medsam", Path(__file__).resolve().parents[2] / "scripts" / "device" / "restore_medsam.py"
    )
    restore = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(restore)
    pack.pack_medsam(tmp_path / "medsam")
    assert not list((tmp_path / "medsam").rglob("*.pth"))  # the 39 MB checkpoint stays behind
    bundle = Path(__file__).resolve().parents[2] / "models" / "default.pt"
    restore.main(str(tmp_path / "medsam" / "image_encoder_fp16.pt"), str(bundle), str(tmp_path / "lite.pth"))
    refiner = build_refiner(RefinerConfig(checkpoint=tmp_path / "lite.pth"))
    pretrained = build_refiner(RefinerConfig()).state_dict()
    restored = refiner.state_dict()
    for name, tensor in pretrained.items():
        if name.startswith("image_encoder.") and tensor.is_floating_point():
            assert torch.allclose(restored[name], tensor, rtol=1e-3, atol=1e-3), name
