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
