"""One convention across the command lines: --output_dir everywhere, old spellings warned, usage errors 2."""

from __future__ import annotations

import argparse

import pytest

from retclip_dist import demo
from retclip_dist.cli_args import add_output_dir
from retclip_dist.eval.cli import main as eval_main
from retclip_dist.exit_codes import EXIT_CONFIG


def _parser(default: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    add_output_dir(parser, help="where output goes", default=default)
    return parser


def test_output_dir_and_its_old_spelling(capsys):
    assert _parser(None).parse_args(["--output_dir", "a"]).output_dir == "a"
    assert capsys.readouterr().err == ""
    assert _parser(None).parse_args(["--out", "b"]).output_dir == "b"
    assert (
        capsys.readouterr().err == "tool: warning: --out is now --output_dir; the old name will be removed\n"
    )
    assert _parser("d").parse_args([]).output_dir == "d"
    # Missing when required, or both spellings at once: argparse's usage error, exit code 2.
    for argv, default in (([], None), (["--out", "x", "--output_dir", "y"], "d")):
        with pytest.raises(SystemExit) as info:
            _parser(default).parse_args(argv)
        assert info.value.code == EXIT_CONFIG


def test_retclip_eval_reads_out_dir_as_output_dir_with_a_warning(capsys):
    assert eval_main(["features", "--print-config", "--out_dir", "results/x"]) == 0
    out, err = capsys.readouterr()
    assert '"output_dir": "results/x"' in out
    assert err == "warning: command line: 'out_dir' is now 'output_dir'; the old name will be removed\n"


def test_retclip_eval_usage_and_path_errors_exit_2(tmp_path, capsys):
    assert eval_main([]) == EXIT_CONFIG
    assert eval_main(["features", "--no-such.key", "1"]) == EXIT_CONFIG
    assert "unknown key(s) ['no-such']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        eval_main(["convert-release", "x.pt"])  # --vocab and --output_dir missing
    assert info.value.code == EXIT_CONFIG


def test_demo_passes_on_a_failed_stage_exit_code(tmp_path, capsys):
    # retclip-train --launch refuses 0 processes before starting anything: the demo stops with its code.
    code = demo.main(["--output_dir", str(tmp_path), "--patients", "4", "--processes", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert err.splitlines()[-1].startswith("demo: retclip-train --launch exited with code 2")
