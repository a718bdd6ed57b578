#!/bin/bash
# Install what the tests need (Debian packages, a venv in .venv with the package editable)
# and run the whole suite: lint, unit tests and kernel tests in network namespaces.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
apt_install "${RUNTIME_DEBS[@]}" "${TEST_DEBS[@]}"
make_venv "$REPO/.venv" test
cd "$REPO"
echo "==> ruff"
.venv/bin/ruff check src tests bench
echo "==> mypy"
.venv/bin/mypy src
echo "==> pytest"
# CI=true turns a missing kernel prerequisite into a failure instead of a skip.
exec .venv/bin/python -m pytest -ra "$@"
