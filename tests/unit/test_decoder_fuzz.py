"""Seeded mutation-fuzzing runs of the upload decoders, in a child process so that a native
decoder aborting the process (as GDCM did, see test_dicom_files.py) fails this test instead of
killing the test run. ``python tests/fuzz_decoders.py --iterations 20000 --seed N`` runs more
(``--target seg --validate`` for the DICOM SEG path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "fuzz_decoders.py"
REPO_ROOT = SCRIPT.parents[1]


def _fuzz(*args: str) -> subprocess.CompletedProcess:
    """The fuzzer run with these arguments in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )


def test_mutated_uploads_decode_or_are_a_4xx_and_never_kill_the_process():
    result = _fuzz("--iterations", "1500", "--seed", "2026")
    last_case = [line for line in result.stderr.splitlines() if line.startswith("case ")][-1:]
    assert result.returncode == 0, f"the decoder process died (code {result.returncode}) at {last_case}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["iterations"] == 1500 and report["seed_files"] > 50
    assert report["findings"] == []
    assert report["decoded"] + report["4xx"] == 1500
    assert report["decoded"] > 100 and report["4xx"] > 500  # both outcomes are exercised


def test_mutated_correction_masks_decode_or_are_a_4xx():
    # Found this way: a mask whose header declares a huge canvas was a 500 (Pillow's bomb guard).
    result = _fuzz("--target", "mask", "--iterations", "1500", "--seed", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "mask" and report["seed_files"] == 6
    assert report["findings"] == []
    assert report["decoded"] > 50 and report["4xx"] > 500


def test_dicom_headers_with_bad_values_get_a_valid_seg_or_a_4xx():
    # Found this way: a NumberOfFrames above the compressed data's fragments (a 500 from the SEG's
    # frame array), a Modality starting with a digit and an empty SpecificCharacterSet (highdicom
    # refused the SEG), missing pixel attributes, and SEGs failing the validator on copied
    # PatientOrientation, LossyImageCompression, PatientIdentityRemoved, clinical-trial and
    # SliceThickness values.
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is not installed; scripts/test.sh installs it")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    result = _fuzz("--target", "seg", "--iterations", "800", "--seed", "2026", "--validate")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["target"] == "seg" and report["seed_files"] > 100
    assert report["findings"] == []
    assert report["decoded"] + report["4xx"] + report["unwritable"] == 800
    assert report["decoded"] > 250 and report["4xx"] > 150  # SEGs built and validated, and refusals
