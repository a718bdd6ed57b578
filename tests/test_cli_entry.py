"""The entry point tells the launch form from subcommands, also behind ``--debug``."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from via_tunnel import __version__
from via_tunnel.cli import main as cli_main
from via_tunnel.core.errors import DEBUG_HINT


def test_debug_before_a_subcommand_runs_the_subcommand(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert cli_main.main(["--debug", "version"]) == 0
    assert capsys.readouterr().out.strip() == __version__


def test_debug_before_the_launch_form_is_still_the_launch_form() -> None:
    assert not cli_main._is_subcommand(["--debug", "vlan3", "--", "true"])
    assert not cli_main._is_subcommand(["--debug", "status", "--", "true"])
    assert cli_main._is_subcommand(["--debug", "status"])


def test_the_internal_error_hint_names_a_form_that_parses() -> None:
    assert "via-tunnel --debug" in DEBUG_HINT


def test_the_plain_status_forms_skip_typer_and_the_rest_do_not() -> None:
    from via_tunnel.cli.status_command import fast_form

    assert fast_form(["status"]) is False
    assert fast_form(["--debug", "status", "--json"]) is True
    for other in (["status", "--help"], ["status", "--jsn"], ["status", "--json", "x"]):
        assert fast_form(other) is None


def test_status_answers_without_importing_typer(tmp_path: pathlib.Path) -> None:
    """Its import (with pydantic) cost ~150 ms, more than status itself at 1000 groups."""
    probe = ("import json, sys\n"
             "from via_tunnel.cli.main import main\n"
             "rc = main(['status', '--json'])\n"
             "print('typer' in sys.modules, file=sys.stderr)\n"
             "sys.exit(rc)\n")
    env = {**os.environ, "VIA_TUNNEL_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stderr.strip() == "False"
    assert json.loads(out.stdout)["groups"] == []
