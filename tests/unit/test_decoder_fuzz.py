"""Seeded mutation-fuzzing runs of the upload decoders, in a child process so that a native
decoder aborting the process (as GDCM did, see test_dicom_files.py) fails this test instead of
killing the test run. ``python tests/fuzz_decoders.py --iterations 20000 --seed N`` runs more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "fuzz_decoders.py"
REPO_ROOT = SCRIPT.parents[1]


def test_mutated_uploads_decode_or_are_a_4xx_and_never_kill_the_process():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--iterations", "1500", "--seed", "2026"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    last_case = [line for line in result.stderr.splitlines() if line.startswith("case ")][-1:]
    assert result.returncode == 0, f"the decoder process died (code {result.returncode}) at {last_case}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["iterations"] == 1500 and report["seed_files"] > 50
    assert report["findings"] == []
    assert report["decoded"] + report["4xx"] == 1500
    assert report["decoded"] > 100 and report["4xx"] > 500  # both outcomes are exercised


def test_mutated_correction_masks_decode_or_are_a_4xx():
    # Found this way: a mask whose header declares a huge canvas was a 500 (Pillow's bomb guard).
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", "mask", "--iterations", "1500", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "mask" and report["seed_files"] == 6
    assert report["findings"] == []
    assert report["decoded"] > 50 and report["4xx"] > 500
