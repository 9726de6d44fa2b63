#!/usr/bin/env bash
# Installs kdviewer with its test extras into the active Python and runs lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
export QT_QPA_PLATFORM=offscreen
ruff check .
python -m pytest -q "$@"
