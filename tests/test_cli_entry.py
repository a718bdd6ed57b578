"""The entry point tells the launch form from subcommands, also behind ``--debug``."""

from __future__ import annotations

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
