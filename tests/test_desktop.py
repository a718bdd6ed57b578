"""`via-tunnel desktop`: user copies of desktop entries that launch through an interface.

The result is checked with Debian's ``desktop-file-validate`` (an independent oracle), in a
temporary XDG tree; no root, no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from via_tunnel.cli import desktop
from via_tunnel.core.errors import ViaTunnelError

SAMPLE = """\
# A browser, as distributions ship it
[Desktop Entry]
Version=1.0
Type=Application
Name=Web Browser
Name[de]=Webbrowser
Name[fr_FR]=Navigateur Web
GenericName=Browser
Comment=Browse the web
TryExec=sh
Exec=sh -c "exec true" browser %u
Icon=web-browser
Terminal=false
Categories=Network;WebBrowser;
MimeType=text/html;x-scheme-handler/http;
DBusActivatable=true
Actions=new-window;private;

[Desktop Action new-window]
Name=New Window
Exec=sh --new-window %U

[Desktop Action private]
Name=New Private Window
Exec=sh --private-window %F
"""


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    system = tmp_path / "system"
    (system / "applications").mkdir(parents=True)
    (system / "applications" / "org.example.Browser.desktop").write_text(SAMPLE)
    monkeypatch.setenv("XDG_DATA_DIRS", str(system))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    return tmp_path


def validate(path: Path) -> None:
    tool = shutil.which("desktop-file-validate")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("desktop-file-validate is missing (CI is set: refusing to skip)")
        pytest.skip("desktop-file-validate (desktop-file-utils) is not installed")
    r = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def test_sample_is_valid_to_begin_with(xdg: Path) -> None:
    validate(xdg / "system" / "applications" / "org.example.Browser.desktop")


def test_install_prefixes_every_exec_and_names_the_interface(xdg: Path) -> None:
    msg = desktop.install("org.example.Browser.desktop", "vlan3")
    target = xdg / "home" / "applications" / "org.example.Browser.desktop"
    assert str(target) in msg
    text = target.read_text()
    validate(target)
    execs = [ln for ln in text.splitlines() if ln.startswith("Exec=")]
    via = shutil.which("via-tunnel") or "via-tunnel"
    assert execs == [
        f'Exec={via} vlan3 -- sh -c "exec true" browser %u',
        f"Exec={via} vlan3 -- sh --new-window %U",
        f"Exec={via} vlan3 -- sh --private-window %F",
    ]
    assert "Name=Web Browser (via vlan3)" in text
    assert "Name[de]=Webbrowser (via vlan3)" in text
    assert "Name[fr_FR]=Navigateur Web (via vlan3)" in text
    assert "Name=New Window\n" in text  # actions keep their names
    assert "DBusActivatable" not in text
    assert "TryExec=sh" in text and "GenericName=Browser" in text
    assert "# A browser, as distributions ship it" in text
    assert desktop.list_installed() == [(str(target), "vlan3")]


def test_reinstall_replaces_our_copy_and_never_prefixes_twice(xdg: Path) -> None:
    desktop.install("org.example.Browser.desktop", "vlan3")
    desktop.install("org.example.Browser.desktop", "tun0")  # the source: the system entry
    text = (xdg / "home" / "applications" / "org.example.Browser.desktop").read_text()
    assert "vlan3" not in text and text.count(" tun0 -- ") == 3


def test_remove_and_list_touch_only_our_files(xdg: Path) -> None:
    mine = xdg / "home" / "applications"
    mine.mkdir(parents=True)
    (mine / "other.desktop").write_text(SAMPLE)
    with pytest.raises(ViaTunnelError, match="not written by via-tunnel"):
        desktop.remove("other.desktop")
    with pytest.raises(ViaTunnelError, match="not written by via-tunnel"):
        desktop.install(str(mine / "other.desktop"), "vlan3")  # would overwrite the source
    desktop.install("org.example.Browser.desktop", "vlan3")
    listed = [os.path.basename(p) for p, _ in desktop.list_installed()]
    assert listed == ["org.example.Browser.desktop"]
    assert "removed" in desktop.remove("org.example.Browser.desktop")
    assert desktop.list_installed() == []
    assert (mine / "other.desktop").exists()
    with pytest.raises(ViaTunnelError, match="not installed"):
        desktop.remove("org.example.Browser.desktop")


def test_a_path_works_and_odd_interface_names_are_quoted(xdg: Path, tmp_path: Path) -> None:
    src = tmp_path / "custom.desktop"
    src.write_text(SAMPLE)
    desktop.install(str(src), "we$ird%1")
    target = xdg / "home" / "applications" / "custom.desktop"
    validate(target)
    first = next(ln for ln in target.read_text().splitlines() if ln.startswith("Exec="))
    assert ' "we\\\\$ird%%1" -- ' in first


@pytest.mark.parametrize(("text", "message"), [
    ("[Desktop Entry]\nType=Link\nName=x\nURL=http://x/\n", "Type=Application"),
    ("[Desktop Entry]\nType=Application\nName=x\nDBusActivatable=true\n", "no Exec="),
    ("Name=x\n", "not a desktop entry"),
])
def test_unusable_entries_are_refused(text: str, message: str) -> None:
    with pytest.raises(ViaTunnelError, match=message):
        desktop.transform(text, "vlan3")


def test_missing_entry_and_bad_names(xdg: Path) -> None:
    with pytest.raises(ViaTunnelError, match="not found in any applications directory"):
        desktop.install("nosuch.desktop", "vlan3")
    with pytest.raises(ViaTunnelError, match=r"ends in \.desktop"):
        desktop.install("browser", "vlan3")
    with pytest.raises(ViaTunnelError, match="forbids"):
        desktop.install("org.example.Browser.desktop", "bad/name")
