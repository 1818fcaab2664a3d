"""Probe (issue 17): the refiner's image placed smaller inside its 256² input, to encode less.

Today an image is resized so that its longer side is 256 (``Geometry.resized_hw``) and the encoder
crop then encodes that part, the shorter side rounded up to 56 px. This probe resizes the longer side
to ``--long-side`` instead (a multiple of 56 below 256) and rounds *both* sides of the crop up to
the bundle's ``refiner.encoder_crop_multiple`` (56). Nothing else changes: same 256² canvas, prompt
encoder and decoder, the masks mapped back through the same ``Geometry``. It patches the two
functions for the process and then runs ``benchmarks/accuracy_engines.py`` with the remaining
arguments, so its JSON is that script's.

    python docs/runs/scale-probe-20261207/scale_probe.py --long-side 224 -- \
        --split-file models/default_split.json --fold 0 --prompt coarse --engines openvino-bf16
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from benchmarks import accuracy_engines  # noqa: E402
from training.data import transforms  # noqa: E402
from training.modeling import encoder_crop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long-side", type=int, required=True)
    args, rest = parser.parse_known_args()
    long_side = args.long_side
    if rest and rest[0] == "--":
        rest = rest[1:]

    def resized_hw(self) -> tuple[int, int]:
        scale = min(long_side, self.size) / max(self.height, self.width)
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    def crop_shape(used_hw: tuple[int, int], size: int, multiple: int) -> tuple[int, int]:
        return tuple(min(size, max(multiple, math.ceil(side / multiple) * multiple)) for side in used_hw)

    if long_side < 256:
        transforms.Geometry.resized_hw = property(resized_hw)
        encoder_crop.crop_shape = crop_shape
    report = accuracy_engines.main(rest)
    print(f"long side {long_side}: {report['engines']}"[:300], file=sys.stderr)


if __name__ == "__main__":
    main()
