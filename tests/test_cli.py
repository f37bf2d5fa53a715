"""Command-line conveniences (issue 19): --version, -q / -v after the command, the summary table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.cli import _print_reports, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("pipeline ")


@pytest.mark.parametrize("argv", [["-q", "run"], ["run", "-q"], ["status", "--quiet"], ["-v", "config"], ["config", "-v"]])
def test_quiet_and_verbose_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet == ("-q" in argv or "--quiet" in argv)
    assert args.verbose == ("-v" in argv)


def test_summary_table_stays_aligned_with_long_stage_names(capsys):
    report = lambda stage: SimpleNamespace(stage=stage, state="done", computed=1, cached=0, failed=[], seconds=1.0, summary={})  # noqa: E731
    assert _print_reports([report("extract"), report("mist_generator"), report("evaluate")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len({line.index(" done") if "done" in line else line.index(" state") for line in rows}) == 1


def test_status_and_config_start_from_the_saved_config_and_another_method_drops_its_training(tmp_path, capsys):
    """Issue 19: `pipeline status --method mist` on a run saved by sultani_mil failed with "unknown
    config key 'train.lambda_smooth'"; `pipeline config --run-dir RUN` ignored the saved config."""
    from pipeline.core.config import dump_config
    from stages.config import build_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = build_config(sets=["data.manifest=my.csv", "train.lambda_smooth=0.5"], method="sultani_mil")
    (run_dir / "config.yaml").write_text(dump_config(saved))
    assert main(["config", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "data.manifest = 'my.csv'" in out and "train.lambda_smooth = 0.5" in out
    assert main(["config", "--run-dir", str(run_dir), "--method", "mist"]) == 0
    out = capsys.readouterr().out
    assert "train.method = mist" in out and "data.manifest = 'my.csv'" in out and "lambda_smooth = 0.0" in out


def test_a_run_directory_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, request):
    """Issue 19: a read-only run directory ended in a traceback at `.lock`."""
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a directory")
    assert main(["-q", "run", "--run-dir", str(in_the_way / "run"), "--stage", "extract"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run directory cannot be written" in err and str(in_the_way) in err

    request.getfixturevalue("read_only_mount")
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    assert main(["-q", "run", "--run-dir", str(run_dir), "--stage", "extract"]) == 2
    err = capsys.readouterr().err
    assert "ro: the run directory cannot be written (Read-only file system)" in err and err.count("\n") == 1


def test_preset_quick_shortens_the_schedule_under_config_and_set(tmp_path, capsys):
    """Issue 19: short schedules existed only in code (Detector.short_schedule); --preset quick offers them."""
    from models import DETECTORS
    from stages.config import QUICK_ITERATIONS, QUICK_MIST_STAGE2

    for method in DETECTORS.list():
        assert main(["config", "--preset", "quick", "--method", method, "--run-dir", str(tmp_path / "none")]) == 0
        shown = capsys.readouterr().out
        want = {"iterations": QUICK_ITERATIONS, **DETECTORS.get_class(method).short_schedule}
        if method == "mist":
            want.update(QUICK_MIST_STAGE2)
        for key, value in want.items():
            assert f"train.{key} = {value!r}" in shown, (method, key)
    # --set wins over the preset; without the preset the published schedule stays the default
    main(["config", "--preset", "quick", "--method", "rtfm", "--set", "train.iterations=50", "--run-dir", str(tmp_path / "n")])
    assert "train.iterations = 50 " in capsys.readouterr().out
    main(["config", "--method", "rtfm", "--run-dir", str(tmp_path / "n")])
    assert "train.iterations = 15000 " in capsys.readouterr().out


def test_the_cli_flushes_denormals_before_torch_computes() -> None:
    """pipeline.cli.flush_denormals, called before torch's thread pool exists: denormal floats read
    as zero in every thread afterwards (DAZ); without it CPU training slowed 25x on the demo (the
    function's docstring). Each case in a fresh process, since the setting is per thread."""
    import subprocess
    import sys

    code = ("import numpy as np, torch\n"
            "{flush}"
            "x = torch.from_numpy(np.full(1 << 18, 1e-39, np.float32))\n"
            "print(float((x * 1.0).sum()))\n")

    def total(flush: str) -> float:
        out = subprocess.run([sys.executable, "-c", code.format(flush=flush)], capture_output=True, text=True,
                             check=True).stdout
        return float(out)

    assert total("") > 0
    assert total("from pipeline.cli import flush_denormals\nflush_denormals()\n") == 0.0
