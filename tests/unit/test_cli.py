"""The CLI: one generated flag per hyper-parameter, flags that reach the code, clear errors."""

from __future__ import annotations

import json

import pytest
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner

from training.checkpoints import load_bundle, load_checkpoint
from training.cli import app, build_config, config_flags
from training.config import TrainingConfig

runner = CliRunner()


def _output(result) -> str:
    return result.output + (result.stderr or "")


def _leaf_fields() -> set[tuple[str, ...]]:
    leaves = set()
    for name, field in TrainingConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves |= {(name, sub) for sub in annotation.model_fields}
        else:
            leaves.add((name,))
    return leaves


def test_every_hyper_parameter_has_a_train_flag():
    flags = config_flags()
    covered = {flag.path for flag in flags}
    set_otherwise = {("config_name",), ("phases",), ("transunet", "name")}  # --config, the phase argument
    assert covered | set_otherwise == _leaf_fields()
    assert len({flag.flag for flag in flags}) == len(flags)
    train = typer.main.get_command(app).commands["train"]
    options = {opt for param in train.params for opt in param.opts}
    assert {flag.flag for flag in flags} <= options
    assert {"--config", "--epochs", "--resume", "--dataset", "--root", "--folds", "--limit"} <= options


@pytest.mark.parametrize(
    ("flag", "path"),
    [
        ("--change-penalty-weight", ("refiner_train", "change_penalty_weight")),
        ("--real-ratio", ("refiner_train", "real_ratio")),
        ("--coarse-grad-scale", ("end_to_end", "coarse_grad_scale")),
        ("--coarse-lr", ("coarse", "lr")),
        ("--refiner-lr", ("refiner_train", "lr")),
        ("--end-to-end-epochs", ("end_to_end", "epochs")),
        ("--folds-to-run", ("coarse", "folds_to_run")),
        ("--refiner-pretrained", ("refiner", "pretrained")),
        ("--coarse-augment", ("coarse", "augment")),
        ("--output-dir", ("output_dir",)),
    ],
)
def test_flag_names(flag, path):
    assert {f.flag: f.path for f in config_flags()}[flag] == path


def test_build_config_from_options():
    params = {f.flag: f.param for f in config_flags()}
    cfg = build_config(
        {
            params["--coarse-epochs"]: "7",
            params["--change-penalty-weight"]: "0.25",
            params["--folds-to-run"]: "0,2",
            params["--resnet-units"]: "1,1,1",
            params["--unfreeze-epoch"]: "none",
            params["--use-box"]: False,
            params["--limit"]: "12",
        },
        epochs=2,
        phases=["coarse"],
    )
    assert (cfg.coarse.epochs, cfg.refiner_train.epochs, cfg.end_to_end.epochs) == (7, 2, 2)
    assert cfg.refiner_train.change_penalty_weight == 0.25
    assert cfg.coarse.folds_to_run == [0, 2]
    assert cfg.transunet.resnet_units == (1, 1, 1)
    assert cfg.transunet.hidden_size == TrainingConfig.named("compact").transunet.hidden_size  # still compact
    assert cfg.end_to_end.unfreeze_epoch is None and cfg.refiner.use_box is False
    assert cfg.data.limit == 12 and cfg.phases == ["coarse"]
    assert build_config({}, config_name="full").transunet.hidden_size == 768


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, synthetic_busi_root, fake_refiner_encode):
    """``train coarse``, ``train augment``, ``train refiner`` chained in one output dir by the CLI."""
    from training.modeling.refiner import Refiner

    base = tmp_path_factory.mktemp("cli")
    run = base / "run"
    common = [
        *("--root", str(synthetic_busi_root), "--output-dir", str(run), "--cache-dir", str(base / "cache")),
        *("--folds", "2", "--epochs", "1", "--img-size", "64", "--device", "cpu", "--no-refiner-pretrained"),
        *("--coarse-batch-size", "4", "--refiner-batch-size", "4", "--per-mask", "2", "--no-progress"),
        *("--change-penalty-weight", "2.5", "--coarse-lr", "0.003"),
    ]
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Refiner, "encode", fake_refiner_encode)
        for phase in ("coarse", "augment", "refiner"):
            results[phase] = runner.invoke(app, ["train", phase, *common])
            assert results[phase].exit_code == 0, _output(results[phase])
    return run, results


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_flags_reach_the_checkpoint_and_the_optimizer(cli_run):
    run, results = cli_run
    checkpoint = load_checkpoint(run / "coarse" / "fold0" / "last.pt")
    assert checkpoint["config"]["refiner_train"]["change_penalty_weight"] == 2.5
    assert checkpoint["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.003)
    assert json.loads((run / "config.json").read_text())["transunet"]["img_size"] == 64
    assert json.loads(results["coarse"].stdout)["bundle_path"] == str(run / "bundle.pt")


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_no_progress_prints_plain_epoch_lines_to_stderr(cli_run):
    _, results = cli_run
    coarse_lines = [line for line in results["coarse"].stderr.splitlines() if line.startswith("coarse fold")]
    assert [line.split(":")[0] for line in coarse_lines] == [
        "coarse fold 0 epoch 1/1",
        "coarse fold 1 epoch 1/1",
    ]
    assert all("val Dice" in line for line in coarse_lines)
    assert any(line.startswith("refiner epoch 1/1:") for line in results["refiner"].stderr.splitlines())
    embedding_lines = [line for line in results["refiner"].stderr.splitlines() if "embedding images" in line]
    assert embedding_lines and embedding_lines[-1].startswith("refiner: embedding images")
    done, total = embedding_lines[-1].rsplit(" ", 1)[1].split("/")
    assert done == total and int(total) > 0
    assert "\x1b[" not in results["coarse"].stderr  # plain text, no bar or colour codes in a log
    json.loads(results["coarse"].stdout)  # stdout stays the JSON summary alone


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_change_penalty_flag_reaches_the_loss(cli_run):
    run, _ = cli_run
    epoch = load_checkpoint(run / "refiner" / "last.pt")["history"][0]
    assert epoch["train_change"] > 0
    expected = epoch["train_bce"] + epoch["train_dice"] + 2.5 * epoch["train_change"]
    assert epoch["train_total"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_export_evaluate_and_split_commands(cli_run, synthetic_busi_root, tmp_path, fast_refiner_encoder):
    run, _ = cli_run
    exported = tmp_path / "exported.pt"
    result = runner.invoke(app, ["export", "--run-dir", str(run), "--output", str(exported)])
    assert result.exit_code == 0, _output(result)
    bundle = load_bundle(exported)
    assert bundle["metrics"]["sources"]["refiner"] == "refiner/best.pt"

    report_path = tmp_path / "report.json"
    args = ["evaluate", "--dataset", "busi", "--root", str(synthetic_busi_root), "--model", str(exported)]
    result = runner.invoke(app, [*args, "--output", str(report_path)])
    assert result.exit_code == 0, _output(result)
    report = json.loads(report_path.read_text())
    assert {"n_images", "dice_coarse", "dice_refined", "delta", "per_image", "normal"} <= set(report)
    run_split = json.loads((run / "split.json").read_text())
    assert sorted(r["id"] for r in report["per_image"]) == sorted(run_split["test_ids"])  # same seeded split

    split_path = tmp_path / "split.json"
    split_args = ["split", "--dataset", "busi", "--root", str(synthetic_busi_root), "--folds", "2"]
    result = runner.invoke(app, [*split_args, "--output", str(split_path)])
    assert result.exit_code == 0, _output(result)
    assert json.loads(split_path.read_text())["folds"] == run_split["folds"]

    result = runner.invoke(app, [*args, "--split", "all", "--output", str(report_path)])
    assert result.exit_code == 0, _output(result)
    assert len(json.loads(report_path.read_text())["per_image"]) == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "coarse", "--root", "/nonexistent/BUSI", "--no-progress"], "not found"),
        (["train", "refiner", "--real-ratio", "2", "--no-progress"], "--real-ratio"),
        (["train", "coarse", "--coarse-lr", "fast", "--no-progress"], "--coarse-lr"),
        (["evaluate", "--dataset", "busi", "--root", "/nonexistent", "--output", "r.json"], "not found"),
        (["export", "--run-dir", "/nonexistent/run", "--output", "b.pt"], "not found"),
    ],
)
def test_errors_exit_2_without_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, _output(result)
    assert message in _output(result)
    assert "Traceback" not in _output(result)


def test_bad_bundle_exits_2(tmp_path, synthetic_busi_root):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--dataset",
            "busi",
            "--root",
            str(synthetic_busi_root),
            "--model",
            str(junk),
            "--output",
            "r.json",
        ],
    )
    assert result.exit_code == 2
    assert "not a readable UltraRefiner bundle" in _output(result) and "Traceback" not in _output(result)
