"""man/via-tunnel.1 renders without a warning and documents the whole CLI.

The CLI is introspected (completion_gen.model(): the typer app and launch_form.LAUNCH_OPTIONS),
so a new subcommand or option fails this test until the man page describes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from via_tunnel import __version__
from via_tunnel.cli import completion_gen

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "man" / "via-tunnel.1"
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS",
            "ENVIRONMENT", "FILES", "SECURITY", "EXAMPLES", "SEE ALSO"]


def render() -> str:
    """The page as man shows it, with plain hyphens and one space between words."""
    if shutil.which("groff") is None:
        if os.environ.get("CI"):
            pytest.fail("groff is not installed", pytrace=False)
        pytest.skip("groff is not installed")
    # -rHY=0: no hyphenation, so that no option is split at a line end
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rHY=0", "-P-cbou", str(PAGE)],
                         capture_output=True, text=True, check=True)
    assert out.stderr == ""
    text = out.stdout.replace("\u2010", "-").replace("\u2212", "-")
    return " ".join(text.split())


def test_renders_without_warnings() -> None:
    if shutil.which("groff") is None:
        render()  # skips, or fails in CI
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (0, "")


def test_has_the_sections_and_the_current_version() -> None:
    source = PAGE.read_text()
    for name in SECTIONS:
        assert re.search(rf'^\.SH "?{name}"?$', source, re.M), name
    assert f'"via-tunnel {__version__}"' in source.splitlines()[0]


def test_documents_every_subcommand_and_option() -> None:
    text = render()
    commands = completion_gen.model()
    missing = []
    for node in commands.walk():
        if node.path and " ".join(node.path) not in text:
            missing.append(" ".join(node.path))
        missing += [o.name for o in node.options
                    if not re.search(rf"(?<![\w-]){re.escape(o.name)}(?![\w-])", text)]
    assert not missing, f"not in man/via-tunnel.1: {sorted(set(missing))}"


def test_documents_exit_codes_environment_and_units() -> None:
    text = render()
    from via_tunnel.core import errors

    section = text.split(" EXIT STATUS ", 1)[1].split(" ENVIRONMENT ", 1)[0]
    for code in (errors.EXIT_USAGE, errors.EXIT_FAILURE, errors.EXIT_CANNOT_EXEC,
                 errors.EXIT_NOT_FOUND):
        assert re.search(rf"(^| ){code} \S", section), code
    # every VIA_TUNNEL_* variable the code reads
    names = set()
    for path in (REPO / "src" / "via_tunnel").rglob("*.py"):
        names |= set(re.findall(r"\bVIA_TUNNEL_[A-Z_]+\b", path.read_text()))
    assert names, "no VIA_TUNNEL_* variables found: the pattern is wrong"
    assert {n for n in names if n not in text} == set()
    for unit in (REPO / "systemd").iterdir():
        assert unit.name in text, unit.name
    for ref in ("ip-rule(8)", "nft(8)", "cgroups(7)", "systemd-run(1)"):
        assert ref in text
