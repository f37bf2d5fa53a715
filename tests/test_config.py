"""Config: dataclass defaults, YAML and --set overrides, validation before any work."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import main
from pipeline.core.config import ConfigError, dump_config, load_yaml
from stages.config import build_config


def test_defaults_are_the_papers():
    cfg = build_config()
    assert cfg.train.method == "sultani_mil"
    assert cfg.train.lr == 0.01 and cfg.train.iterations == 20000 and cfg.train.batch_abnormal == 30
    assert cfg.extract.clip_len == 16 and cfg.segment.num_segments == 32


def test_yaml_then_set_then_method(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.05\n  iterations: 10\nextract:\n  crops: 5\n")
    cfg = build_config([load_yaml(f)], ["train.lr=0.002"])
    assert cfg.train.lr == 0.002 and cfg.train.iterations == 10 and cfg.extract.crops == "5"


def test_resolved_config_round_trips(tmp_path):
    cfg = build_config(sets=["train.hidden=[64, 8]", "evaluate.far_threshold=0.3"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    again = build_config([yaml.safe_load(f.read_text())])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["train.iterations=1.5"], "train.iterations: expected int"),
        (["extract.crops=3"], "extract.crops: '3' is not one of"),
        (["evaluate.plots=maybe"], "evaluate.plots: expected bool"),
        (["extrct.crops=5"], "unknown config section 'extrct' (did you mean 'extract'?)"),
        (["train.lr"], "expected section.key=value"),
        (["train.lr=-1"], "lr must be > 0"),
        (["train.method=nope"], "unknown detector 'nope'"),
    ],
)
def test_bad_values_are_clear_errors(sets, message):
    with pytest.raises(ConfigError) as e:
        build_config(sets=sets)
    assert message in str(e.value)


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", "--run-dir", str(run_dir), "--set", "train.lrr=0.1"])
    assert code == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert not run_dir.exists()


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("setting", ["train.device=cuda", "extract.device=cuda:0", "flow.device=cuda"])
def test_a_device_the_machine_lacks_is_a_config_error_before_any_work(tmp_path, capsys, monkeypatch, setting):
    """Issue 19: ``--set train.device=cuda`` without CUDA was a 14-line traceback and exit 1."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = tmp_path / "run"
    code = main(["-q", "run", "--run-dir", str(run_dir), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{setting.partition('=')[0]}=" in err and "no CUDA device" in err
    assert not run_dir.exists()


def test_a_device_name_that_is_not_one_is_a_config_error(tmp_path, capsys):
    code = main(["-q", "run", "--run-dir", str(tmp_path / "run"), "--set", "train.device=gpu"])
    assert code == 2 and "train.device='gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err


def test_status_of_a_mistyped_run_directory_is_an_error(tmp_path, capsys):
    """Issue 19: ``pipeline status --run-dir`` with a typo printed "missing, never run" and exit 0."""
    code = main(["status", "--run-dir", str(tmp_path / "runs" / "deom")])
    assert code == 2 and "deom: no such run directory" in capsys.readouterr().err
