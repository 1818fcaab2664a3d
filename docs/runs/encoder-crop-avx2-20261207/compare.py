"""Image-by-image Dice of two ``benchmarks/accuracy_engines.py`` runs on the same images; prints JSON.

For each engine in both runs: mean Dice of each, the mean and largest absolute per-image change,
and the images that changed most (name, Dice in run A, Dice in run B).

    python docs/runs/encoder-crop-avx2-20261207/compare.py A.json B.json [--top 5]
"""

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    if a["image_names"] != b["image_names"]:
        raise SystemExit("the two runs scored different images")
    names = a["image_names"]
    result = {"a": str(args.a), "b": str(args.b), "n_images": len(names), "engines": {}}
    for engine in sorted(set(a["engines"]) & set(b["engines"])):
        da, db = a["engines"][engine]["dice_per_image"], b["engines"][engine]["dice_per_image"]
        changes = sorted(zip(names, da, db, strict=True), key=lambda row: -abs(row[2] - row[1]))
        result["engines"][engine] = {
            "dice_mean_a": round(statistics.fmean(da), 4),
            "dice_mean_b": round(statistics.fmean(db), 4),
            "mean_abs_change": round(statistics.fmean(abs(y - x) for x, y in zip(da, db, strict=True)), 4),
            "images_changed_by_more_than_0.05": sum(abs(y - x) > 0.05 for x, y in zip(da, db, strict=True)),
            "largest_changes": [
                {"image": name, "dice_a": x, "dice_b": y} for name, x, y in changes[: args.top]
            ],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
