"""Mutation fuzzing of the upload decoders; prints JSON.

``--target image`` (default): :func:`backend.app.imaging.decode_image`, what ``/segment`` and
``/api/corrections`` read an upload with. ``--target mask``:
:func:`backend.app.corrections.decode_mask`, the corrected mask saved beside it (seeds: a binary
mask in PNG, BMP, TIFF, GIF, WebP and JPEG).

Seeds: a BUSI image saved as PNG, JPEG, BMP, TIFF and WebP, and every DICOM file pydicom ships
(all its transfer syntaxes, written by dcmtk, GDCM and scanners). Each case flips bytes, truncates,
or overwrites four bytes near the header of one seed, and is decoded in *this* process: an
outcome other than a decoded image or an :class:`~backend.app.imaging.ImageError` with a 4xx
status is a finding, and a native decoder that aborts the process shows as this script's death
(run it as a child, as ``tests/unit/test_decoder_fuzz.py`` does). Before each case the script
writes the case's number on stderr, so the parent knows which one killed it.

    python tests/fuzz_decoders.py [--iterations 300] [--seed 0] [--target image|mask]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUSI_IMAGE = REPO_ROOT.parent / "shared" / "data" / "BUSI" / "Dataset_BUSI_with_GT" / "benign"
BUSI_IMAGE = BUSI_IMAGE / "benign (1).png"


def seeds() -> list[tuple[str, bytes]]:
    import pydicom.data
    from PIL import Image

    cases: list[tuple[str, bytes]] = []
    if BUSI_IMAGE.is_file():
        with Image.open(BUSI_IMAGE) as image:
            gray = image.convert("L")
            for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
                buffer = io.BytesIO()
                gray.save(buffer, fmt)
                cases.append((f"busi.{fmt.lower()}", buffer.getvalue()))
    folder = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(folder.glob("*.dcm")):
        if path.stat().st_size <= 2_000_000:
            cases.append((path.name, path.read_bytes()))
    return cases


MASK_SHAPE = (120, 160)


def mask_seeds() -> list[tuple[str, bytes]]:
    import numpy as np
    from PIL import Image

    mask = np.zeros(MASK_SHAPE, dtype=np.uint8)
    mask[30:80, 40:100] = 255
    cases = []
    for fmt in ("PNG", "BMP", "TIFF", "GIF", "WEBP", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, fmt)
        cases.append((f"mask.{fmt.lower()}", buffer.getvalue()))
    return cases


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif choice < 0.7:
        del out[rng.randrange(1, len(out)) :]
    else:
        at = rng.randrange(min(len(out), 2000))
        out[at : at + 4] = rng.randbytes(4)
    return bytes(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("image", "mask"), default="image")
    args = parser.parse_args(argv)

    from backend.app.corrections import decode_mask
    from backend.app.imaging import ImageError, decode_image, silence_decoder_logs

    silence_decoder_logs()
    rng = random.Random(args.seed)
    cases = seeds() if args.target == "image" else mask_seeds()
    outcomes = {"decoded": 0, "4xx": 0}
    findings: list[dict] = []
    for iteration in range(args.iterations):
        name, data = cases[rng.randrange(len(cases))]
        mutated = mutate(data, rng)
        print(f"case {iteration} {name}", file=sys.stderr, flush=True)
        is_dicom = name.endswith(".dcm")
        try:
            if args.target == "mask":
                decode_mask(mutated, MASK_SHAPE)
            else:
                decode_image(mutated, content_type="application/dicom" if is_dicom else None, filename=name)
            outcomes["decoded"] += 1
        except ImageError as error:
            if 400 <= error.status_code < 500:
                outcomes["4xx"] += 1
            else:
                findings.append({"case": iteration, "seed_file": name, "status": error.status_code})
        except BaseException as error:  # noqa: B036 - anything else is what the fuzzer looks for
            if isinstance(error, KeyboardInterrupt):
                raise
            findings.append({"case": iteration, "seed_file": name, "exception": type(error).__name__})
    report = {
        "target": args.target,
        "iterations": args.iterations,
        "seed": args.seed,
        "seed_files": len(cases),
        **outcomes,
        "findings": findings,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
