"""Bundle format: atomic writes, validation, clear errors for missing/corrupt/foreign files."""

from __future__ import annotations

import pickle

import pytest
import torch

from training.checkpoints import (
    BUNDLE_FORMAT,
    BundleError,
    BundleNotFoundError,
    build_untrained_bundle,
    bundle_config,
    bundle_metadata,
    load_bundle,
    load_checkpoint,
    save_bundle,
    save_checkpoint,
)
from training.config import PREPROCESSING_VERSION, TrainingConfig, TransUNetConfig


@pytest.fixture(scope="module")
def small_config() -> TrainingConfig:
    transunet = TransUNetConfig.named("compact").model_dump() | {"img_size": 64}
    return TrainingConfig(transunet=transunet, refiner={"pretrained": False})


@pytest.fixture(scope="module")
def untrained(small_config) -> dict:
    return build_untrained_bundle(small_config)


def test_untrained_bundle_format_and_determinism(untrained, small_config):
    assert untrained["format"] == BUNDLE_FORMAT and untrained["format_version"] == 1
    assert untrained["untrained"] is True
    assert untrained["model_version"].endswith("-untrained")
    assert untrained["preprocessing_version"] == PREPROCESSING_VERSION
    assert bundle_config(untrained) == small_config
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in untrained["refiner_state_dict"])
    again = build_untrained_bundle(small_config)
    for key, value in untrained["coarse_state_dict"].items():
        assert torch.equal(value, again["coarse_state_dict"][key])
    assert "coarse_state_dict" not in bundle_metadata(untrained)


def test_save_and_load_roundtrip(untrained, tmp_path):
    path = save_bundle(tmp_path / "models" / "bundle.pt", untrained)
    assert [p.name for p in path.parent.iterdir()] == ["bundle.pt"]  # no temporary file left
    loaded = load_bundle(path)
    assert loaded["model_version"] == untrained["model_version"]
    assert loaded["config"] == untrained["config"]
    for key, value in untrained["refiner_state_dict"].items():
        assert torch.equal(value, loaded["refiner_state_dict"][key])


def test_save_checkpoint_is_atomic(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", epoch=1, weights=torch.ones(3))
    with pytest.raises(Exception):  # noqa: B017 - an unpicklable payload fails mid-save
        save_checkpoint(path, epoch=2, callback=lambda: None)
    assert load_checkpoint(path)["epoch"] == 1  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_bundle_is_a_clear_file_not_found(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(BundleNotFoundError, match="not found") as error:
        load_bundle(missing)
    assert str(missing) in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize(
    "content",
    [b"", b"definitely not a bundle", b"PK\x03\x04truncated zip"],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_bundle(tmp_path, content):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(BundleError, match="corrupt or foreign"):
        load_bundle(path)


def test_truncated_real_bundle(untrained, tmp_path):
    path = save_bundle(tmp_path / "bundle.pt", untrained)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        load_bundle(path)


class _Foreign:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files_are_rejected(tmp_path, untrained):
    state_dict = tmp_path / "sam.pth"
    torch.save(untrained["refiner_state_dict"], state_dict)  # e.g. a plain SAM state dict
    with pytest.raises(BundleError, match="not an UltraRefiner bundle"):
        load_bundle(state_dict)

    pickled = tmp_path / "object.pt"
    pickled.write_bytes(pickle.dumps(_Foreign()))  # never unpickled: weights_only
    with pytest.raises(BundleError):
        load_bundle(pickled)

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(BundleError, match="not an UltraRefiner bundle"):
        load_bundle(tensor)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, "format version"),
        ({"preprocessing_version": "0"}, "preprocessing version"),
        ({"config": {"refiner_train": {"bogus": 1}}}, "invalid training config"),
        ({"coarse_state_dict": {}}, "coarse_state_dict"),
    ],
)
def test_invalid_bundles_name_the_problem(untrained, tmp_path, change, message):
    path = tmp_path / "bad.pt"
    torch.save(untrained | change, path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_incomplete_bundle(untrained, tmp_path):
    path = tmp_path / "incomplete.pt"
    torch.save({k: v for k, v in untrained.items() if k != "metrics"}, path)
    with pytest.raises(BundleError, match="missing metrics"):
        load_bundle(path)


def test_bundles_of_earlier_versions_with_retired_fields_still_load(untrained, tmp_path):
    """``num_workers`` was a top-level field once; stored configs holding it load, other unknown
    fields are still rejected, and a user cannot set the retired field on a new config."""
    path = tmp_path / "older.pt"
    torch.save(untrained | {"config": untrained["config"] | {"num_workers": 0}}, path)
    assert bundle_config(load_bundle(path)) == bundle_config(untrained)
    torch.save(untrained | {"config": untrained["config"] | {"num_wrokers": 0}}, path)
    with pytest.raises(BundleError, match="invalid training config"):
        load_bundle(path)
    with pytest.raises(ValueError, match="num_workers"):
        TrainingConfig(num_workers=2)
