"""The bash completion loads and offers what the CLI has (run by bash itself)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "completions" / "via-tunnel.bash"


def complete(words: str) -> list[str]:
    line = f"via-tunnel {words}"
    argv = line.split(" ")
    script = (f"source {SCRIPT}; _command_offset() {{ COMPREPLY=(CMD); }}; "
              f"COMP_WORDS=({' '.join(repr(w) for w in argv)}); "
              f"COMP_CWORD={len(argv) - 1}; _via_tunnel; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_offers_subcommands_options_and_cmd() -> None:
    assert {"status", "cleanup", "gateway", "daemon", "desktop", "lo"} <= set(complete(""))
    assert {"--dns", "--gateway", "--ipv6", "--user"} <= set(complete("--"))
    assert complete("--ipv6 ") == ["auto", "tunnel", "block"]
    assert complete("gateway ") == ["up", "down", "status"]
    assert complete("lo -- ") == ["CMD"]
