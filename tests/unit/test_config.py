import pytest
from pydantic import ValidationError

from training.config import TrainingConfig, TransUNetConfig


def test_named_configs_pick_architecture():
    full = TrainingConfig.named("full")
    compact = TrainingConfig.named("compact")
    assert full.transunet.hidden_size == 768 and full.transunet.num_layers == 12
    assert full.transunet.resnet_units == (3, 4, 9)
    assert compact.transunet.hidden_size < full.transunet.hidden_size


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValidationError):
        TrainingConfig(refiner_train={"change_penalty_wieght": 1.0})
    with pytest.raises(ValidationError):
        TrainingConfig(data={"folds": 1})
    with pytest.raises(ValidationError):
        TransUNetConfig(hidden_size=100, num_heads=12)


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("ULTRAREFINER_DATA__FOLDS", "3")
    assert TrainingConfig().data.folds == 3
