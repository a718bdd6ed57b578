"""`make install` / `make uninstall` into a staging DESTDIR, and `--version`.

The staged tree is checked file by file: the program (a venv whose scripts name the final
place, not the staging directory, and which runs), the completions where bash, zsh and
fish look, the man page, the systemd units naming the installed program. After
`make uninstall` not one file is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from via_tunnel import __version__

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/usr/local"
VENV = "/opt/via-tunnel"

DATA = {
    f"{PREFIX}/share/bash-completion/completions/via-tunnel": "completions/via-tunnel.bash",
    f"{PREFIX}/share/zsh/site-functions/_via-tunnel": "completions/_via-tunnel",
    f"{PREFIX}/share/fish/vendor_completions.d/via-tunnel.fish": "completions/via-tunnel.fish",
    f"{PREFIX}/share/man/man1/via-tunnel.1": "man/via-tunnel.1",
}
UNITS = ["via-tunnel.service", "via-tunnel.socket", "via-tunnel.slice",
         "via-tunnel-gateway@.service"]


def files_under(root: Path) -> set[str]:
    """Every file and symlink below root, as absolute paths of the installed system."""
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_symlink() or not p.is_dir()}


def make(*args: str) -> None:
    if shutil.which("make") is None:
        if os.environ.get("CI"):
            pytest.fail("make is not installed", pytrace=False)
        pytest.skip("make is not installed")
    subprocess.run(["make", "-C", str(REPO), *args], check=True, capture_output=True,
                   text=True, timeout=600)


def test_make_install_and_uninstall_with_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    make("install", f"DESTDIR={dest}", f"PREFIX={PREFIX}", f"VENV={VENV}")
    installed = files_under(dest)

    # the program: a symlink to the venv's script, which names the final venv
    link = dest / PREFIX.lstrip("/") / "bin/via-tunnel"
    assert os.readlink(link) == f"{VENV}/bin/via-tunnel"
    script = dest / VENV.lstrip("/") / "bin/via-tunnel"
    assert script.read_text().splitlines()[0] == f"#!{VENV}/bin/python"
    for path in (dest / VENV.lstrip("/") / "bin").iterdir():
        if path.is_file() and not path.is_symlink():
            assert str(dest) not in path.read_text(errors="replace"), path
    # and it runs (its python is a symlink to the system's: the staged copy works as is)
    out = subprocess.run([str(dest / VENV.lstrip("/") / "bin/python"), "-m", "via_tunnel",
                          "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __version__

    for target, source in DATA.items():
        assert target in installed, target
        assert (dest / target.lstrip("/")).read_bytes() == (REPO / source).read_bytes()
    units = dest / PREFIX.lstrip("/") / "lib/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    service = (units / "via-tunnel.service").read_text()
    assert f"ExecStart={PREFIX}/bin/via-tunnel daemon" in service
    outside = {p for p in installed
               if not p.startswith((f"{PREFIX}/", f"{VENV}/"))}
    assert not outside, outside

    make("uninstall", f"DESTDIR={dest}", f"PREFIX={PREFIX}", f"VENV={VENV}")
    assert files_under(dest) == set()


def test_prefix_moves_everything_and_units_follow(tmp_path: Path) -> None:
    """install-data alone (no venv) under another PREFIX: the units name that PREFIX."""
    dest = tmp_path / "stage"
    make("install-data", f"DESTDIR={dest}", "PREFIX=/usr")
    installed = files_under(dest)
    zsh = "/usr/share/zsh/vendor-completions/_via-tunnel"  # Debian's place for /usr
    assert {t.replace(PREFIX, "/usr", 1) for t in DATA if "zsh" not in t} | {zsh} <= installed
    service = (dest / "usr/lib/systemd/system/via-tunnel.service").read_text()
    assert "ExecStart=/usr/bin/via-tunnel daemon" in service
    make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr")
    assert files_under(dest) == set()


def test_the_shells_look_where_completions_are_installed() -> None:
    """zsh's fpath (as Debian builds it) holds both places the Makefile picks."""
    if shutil.which("zsh") is None:
        if os.environ.get("CI"):
            pytest.fail("zsh is not installed", pytrace=False)
        pytest.skip("zsh is not installed")
    fpath = subprocess.run(["zsh", "-f", "-c", "print -l $fpath"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert {"/usr/local/share/zsh/site-functions", "/usr/share/zsh/vendor-completions"} \
        <= set(fpath)


def test_version_prints_the_version() -> None:
    for args in (["--version"], ["version"]):
        out = subprocess.run([sys.executable, "-m", "via_tunnel", *args], capture_output=True,
                             text=True, check=True, cwd=REPO)
        assert out.stdout == f"{__version__}\n", args
