"""How BUSI travelled to the GPU machine (whose file transfer is capped at 64 MiB; BUSI is 109 MB).

``pack``: images re-encoded as lossy WebP (quality 90, method 6, Pillow), masks copied unchanged.
``unpack``: WebP decoded back to PNG at native resolution (gray images stored gray again).
The effect on accuracy was measured with the shipped compact model on the test split (MODEL_CARD.md).

    python transfer_busi.py pack ../shared/data/BUSI/Dataset_BUSI_with_GT busi_webp
    python transfer_busi.py unpack busi_webp BUSI   # BUSI/Dataset_BUSI_with_GT/<class>/...
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def pack_one(args: tuple[Path, Path]) -> None:
    source, target = args
    target.parent.mkdir(parents=True, exist_ok=True)
    if "_mask" in source.name:
        shutil.copy(source, target)
    else:
        Image.open(source).save(target.with_suffix(".webp"), format="WEBP", quality=90, method=6)


def unpack_one(args: tuple[Path, Path]) -> None:
    source, target = args
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix != ".webp":
        shutil.copy(source, target)
        return
    rgb = np.asarray(Image.open(source).convert("RGB"))
    gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    Image.fromarray(rgb[..., 0] if gray else rgb).save(target.with_suffix(".png"))


def main(mode: str, source: str, target: str) -> None:
    src, dst = Path(source), Path(target)
    if mode == "unpack":
        dst = dst / "Dataset_BUSI_with_GT"
    jobs = [(path, dst / path.relative_to(src)) for path in sorted(src.glob("*/*"))]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(pack_one if mode == "pack" else unpack_one, jobs, chunksize=8))
    print(f"{mode}: {len(jobs)} files")


if __name__ == "__main__":
    main(*sys.argv[1:4])
