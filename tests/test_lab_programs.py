"""The lab's in-namespace programs run by path, on the standard library alone (no root)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from via_tunnel.lab import procs


def test_programs_import_only_the_standard_library() -> None:
    tree = ast.parse(Path(procs.PROGRAMS_FILE).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)


def test_programs_run_by_path_away_from_the_package(tmp_path: Path) -> None:
    alone = tmp_path / "programs.py"
    shutil.copy(procs.PROGRAMS_FILE, alone)
    argv = procs.helper_argv("udp", "127.0.0.1", "9", "--timeout", "0.2")
    assert argv[:3] == [sys.executable, "-I", procs.PROGRAMS_FILE]
    out = subprocess.run([*argv[:2], str(alone), *argv[3:]], capture_output=True, text=True,
                         timeout=10, check=False)
    assert out.returncode == 1, out.stderr
    assert out.stderr == "no answer from 127.0.0.1 port 9\n"
