"""The shell completions: checked in up to date with the CLI, and driven in real shells.

bash runs the completion function the way readline would call it (COMP_WORDS, COMP_CWORD)
with bash-completion loaded; zsh runs interactively in a pseudo-terminal with compinit
(``compadd`` is wrapped to record what is offered, a key bound to a widget completes);
fish answers ``complete -C LINE``. What each offers is compared with the CLI model
(introspected from the typer app and launch_form.LAUNCH_OPTIONS), never with a hand list.
A test command ``mytool`` with its own completion (alpha, beta) shows the hand-over to
CMD's completion after ``--``.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from via_tunnel.cli import completion_gen
from via_tunnel.cli.completion_gen import Node

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
MACHINE = sorted(os.listdir("/sys/class/net"))
CONFIG = '[interface.tun7]\nallow_users = ["x"]\n\n[ gateway."wg-x" ]\nwan = "eth0"\n' \
         "[interface.lo]\n"
CONFIGURED = ["tun7", "wg-x", "lo"]  # in the file's order; lo also exists on the machine


def require(*programs: str) -> None:
    """Skip when a shell is not installed, except in CI, where that is a failure."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed (scripts/lib.sh TEST_DEBS has it)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


# ------------------------------------------------------------------ shell drivers
# Each takes lines typed after the prompt (the cursor at the end) and returns, per line,
# the candidates the shell's completion offered, in order.

def bash_complete(lines: list[str], env: dict[str, str]) -> list[list[str]]:
    require("bash")
    if not BASH_COMPLETION.exists() and os.environ.get("CI"):
        pytest.fail("bash-completion is not installed", pytrace=False)
    script = [f"source {BASH_COMPLETION} 2>/dev/null" if BASH_COMPLETION.exists() else ":",
              f"source {COMPLETIONS / 'via-tunnel.bash'}",
              "complete -W 'alpha beta' mytool",
              # the function registered for via-tunnel, called as readline would call it
              "fn=$(complete -p via-tunnel | sed -nE 's/.* -F ([^ ]+) .*/\\1/p')"]
    for line in lines:
        words = line.split(" ")
        script += [f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
                   f"COMP_CWORD={len(words) - 1}", f"COMP_LINE={shlex.quote(line)}",
                   f"COMP_POINT={len(line)}", "COMPREPLY=()",
                   '"$fn" via-tunnel "${COMP_WORDS[COMP_CWORD]}" '
                   '"${COMP_WORDS[COMP_CWORD-1]}" 2>/dev/null',
                   "printf '%s\\n' \"${COMPREPLY[@]}\" '<<done>>'"]
    out = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout
    return _split(out)


def fish_complete(lines: list[str], env: dict[str, str]) -> list[list[str]]:
    require("fish")
    script = [f"source {COMPLETIONS / 'via-tunnel.fish'}",
              "complete -c mytool -f -a 'alpha beta'"]
    for line in lines:
        assert "'" not in line
        script += [f"complete -C '{line}'", "echo '<<done>>'"]
    out = subprocess.run(["fish", "--no-config", "-c", "\n".join(script)], capture_output=True,
                         text=True, env=env, timeout=60, check=True).stdout
    return [[c.split("\t")[0] for c in cands] for cands in _split(out)]


ZSH_SETUP = """
PS1='> '
unsetopt autolist automenu beep
fpath=({completions} $fpath)
autoload -Uz compinit && compinit -u -D
_mytool() {{ compadd alpha beta }}
compdef _mytool mytool
# Record what each compadd call offers (its matching words), then let it do its work.
compadd() {{
    if [[ " $* " == *' '-[[:alnum:]]#[OAD]* ]]; then builtin compadd "$@"; return; fi
    local -a vt_hits
    builtin compadd -O vt_hits "$@"
    (( $#vt_hits )) && print -rl -- $vt_hits >> {capture}
    builtin compadd "$@"
}}
vt-capture() {{ zle complete-word; print -r -- '<<done>>' >> {capture} }}
zle -N vt-capture
bindkey '^X^T' vt-capture
"""


def zsh_complete(lines: list[str], env: dict[str, str], tmp: Path) -> list[list[str]]:
    require("zsh")
    capture = tmp / "zsh-capture"
    setup = tmp / "setup.zsh"
    setup.write_text(ZSH_SETUP.format(completions=COMPLETIONS, capture=capture))
    master, slave = pty.openpty()
    proc = subprocess.Popen(["zsh", "-f", "-i"], stdin=slave, stdout=slave, stderr=slave,
                            cwd=tmp, start_new_session=True,
                            env={**env, "TERM": "xterm", "HOME": str(tmp)})
    os.close(slave)
    screen = b""
    try:
        os.write(master, f"source {setup}\n".encode())
        for n, line in enumerate(lines, 1):
            # type the line, complete (^X^T), then erase the line (^U) for the next one
            os.write(master, line.encode() + b"\x18\x14")
            deadline = time.monotonic() + 20
            while not (capture.exists() and capture.read_text().count("<<done>>") >= n):
                if time.monotonic() > deadline:
                    raise AssertionError(f"zsh did not complete {line!r}:\n"
                                         + screen.decode(errors="replace")[-2000:])
                if select.select([master], [], [], 0.05)[0]:
                    screen += os.read(master, 65536)  # keep the terminal drained
            os.write(master, b"\x15")
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    return _split(capture.read_text())


def _split(out: str) -> list[list[str]]:
    blocks = out.split("<<done>>\n")
    assert blocks[-1] == "", out
    return [[c for c in block.split("\n") if c] for block in blocks[:-1]]


Driver = Callable[[list[str]], list[list[str]]]


@pytest.fixture(params=["bash", "zsh", "fish"])
def complete(request: pytest.FixtureRequest, tmp_path: Path) -> Driver:
    """complete(lines) -> candidates per line, in the shell of the parameter, with a config
    file that names interfaces (one of them, lo, also exists on the machine)."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "VIA_TUNNEL_CONFIG": str(config)}
    shell = request.param
    if shell == "bash":
        return lambda lines: bash_complete(lines, env)
    if shell == "fish":
        return lambda lines: fish_complete(lines, env)
    return lambda lines: zsh_complete(lines, env, tmp_path)


def run(complete: Driver, cases: dict[str, object]) -> dict[str, list[str]]:
    lines = list(cases)
    return dict(zip(lines, complete(lines), strict=True))


# ------------------------------------------------------------------ tests

def test_checked_in_completions_are_generated_from_the_cli(tmp_path: Path) -> None:
    assert {p.name for p in COMPLETIONS.iterdir()} == set(completion_gen.FILES)
    for name, text in completion_gen.render().items():
        assert (COMPLETIONS / name).read_text() == text, \
            f"completions/{name} is stale: run python -m via_tunnel.cli.completion_gen"
    # and the --check mode the CI and `make` use notices a stale file
    assert completion_gen.main([str(tmp_path)]) == 0
    assert completion_gen.main(["--check", str(tmp_path)]) == 0
    (tmp_path / "_via-tunnel").write_text("#compdef via-tunnel\n")
    assert completion_gen.main(["--check", str(tmp_path)]) == 1


def test_model_has_the_launch_form_and_every_subcommand() -> None:
    root = completion_gen.model()
    names = {" ".join(n.path) for n in root.walk()}
    assert {"status", "cleanup", "gateway up", "desktop install", "doctor", "trace"} <= names
    from via_tunnel.core.launch_form import LAUNCH_OPTIONS

    assert [o.name for o in root.options][:len(LAUNCH_OPTIONS)] == \
        [o.name for o in LAUNCH_OPTIONS]
    assert {"--version", "--help"} <= {o.name for o in root.options}
    assert [a.kind for a in root.args] == ["iface", "command"]


def test_subcommands_and_options_complete_at_every_level(complete: Driver) -> None:
    nodes: list[Node] = list(completion_gen.model().walk())
    cases: dict[str, object] = {}
    for node in nodes:
        prefix = " ".join(["via-tunnel", *node.path])
        if node.children:
            cases[prefix + " "] = {c.path[-1] for c in node.children}
        cases[prefix + " -"] = {o.name for o in node.options}
    got = run(complete, cases)
    for line, expected in cases.items():
        assert isinstance(expected, set)
        assert expected <= set(got[line]), (line, expected - set(got[line]))
        if line.endswith("-"):  # options only: no interface or subcommand slipped in
            assert set(got[line]) <= expected | {"--"}, (line, got[line])


def test_iface_position_offers_configured_interfaces_first(complete: Driver) -> None:
    machine = [n for n in MACHINE if n not in CONFIGURED]
    interfaces = [*CONFIGURED, *machine]
    got = run(complete, {"via-tunnel ": 0, "via-tunnel --dns 192.0.2.53 --ipv6 block ": 0,
                         "via-tunnel trace ": 0, "via-tunnel gateway up ": 0,
                         "via-tunnel gateway up tun0 --wan ": 0, "via-tunnel doctor ": 0,
                         "via-tunnel desktop install x.desktop ": 0})
    for line, cands in got.items():
        ifaces = [c for c in cands if c in interfaces]
        assert ifaces == interfaces, (line, cands)  # configured first, each once
    subcommands = {" ".join(n.path) for n in completion_gen.model().children}
    assert subcommands <= set(got["via-tunnel "])
    assert not subcommands & set(got["via-tunnel gateway up "])


def test_option_values(complete: Driver, tmp_path: Path) -> None:
    entry = tmp_path / "app-x.desktop"
    entry.write_text("[Desktop Entry]\n")
    got = run(complete, {"via-tunnel --ipv6 ": 0, "via-tunnel --ipv6 tu": 0,
                         "via-tunnel --user roo": 0, "via-tunnel lo ": 0,
                         "via-tunnel --debug lo -": 0,
                         f"via-tunnel desktop install {tmp_path}/app-": 0})
    assert got["via-tunnel --ipv6 "] == ["auto", "tunnel", "block"]
    assert got["via-tunnel --ipv6 tu"] == ["tunnel"]
    assert "root" in got["via-tunnel --user roo"]
    assert got["via-tunnel lo "] == ["--"]  # after IFACE: the separator, then CMD
    assert got["via-tunnel --debug lo -"] == ["--"]  # options end at IFACE
    assert any(c.endswith("app-x.desktop")
               for c in got[f"via-tunnel desktop install {tmp_path}/app-"])


def test_after_double_dash_the_command_completes_itself(complete: Driver) -> None:
    got = run(complete, {
        "via-tunnel lo -- bas": 0,                # CMD: a command name
        "via-tunnel lo -- mytool ": 0,            # its arguments: its own completion
        "via-tunnel --dns 192.0.2.53 lo -- mytool al": 0,
        "via-tunnel lo mytool ": 0,               # `--` is optional in the launch form
        "via-tunnel lo -- mytool --dns ": 0,      # our options mean nothing after --
        "via-tunnel trace lo -- mytool ": 0,      # trace IFACE -- CMD
        "via-tunnel status -- mytool ": 0,        # an interface called "status"
    })
    assert "bash" in got["via-tunnel lo -- bas"]
    assert "status" not in got["via-tunnel lo -- bas"]
    assert got["via-tunnel --dns 192.0.2.53 lo -- mytool al"] == ["alpha"]
    for line in ("via-tunnel lo -- mytool ", "via-tunnel lo mytool ",
                 "via-tunnel lo -- mytool --dns ", "via-tunnel trace lo -- mytool ",
                 "via-tunnel status -- mytool "):
        assert sorted(got[line]) == ["alpha", "beta"], (line, got[line])


def test_bash_completion_passes_shellcheck() -> None:
    """The bash walker as kept in the package and the generated file, with no finding."""
    require("shellcheck")
    driver = Path(completion_gen.__file__).parent / "completion" / "driver.bash"
    for script in (driver, COMPLETIONS / "via-tunnel.bash"):
        out = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_bash_candidates_are_not_expanded_as_globs(tmp_path: Path) -> None:
    """A file called ``x*`` is one candidate, not a pattern that names ``x1`` again."""
    for name in ("x*", "x1"):
        (tmp_path / name).write_text("")
    env = {**os.environ, "VIA_TUNNEL_CONFIG": "/nonexistent"}
    (got,) = bash_complete([f"via-tunnel desktop install {tmp_path}/x"], env)
    assert sorted(got) == [f"{tmp_path}/x*", f"{tmp_path}/x1"]
