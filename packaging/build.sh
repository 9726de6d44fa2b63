#!/usr/bin/env bash
# Build the frozen desktop app into dist/kdviewer/ (a runnable folder) and run its smoke test.
#
#   packaging/build.sh              # uses the active Python environment (needs `pip install .[package]`)
#
# For a small app build from a venv with the CPU torch wheel (see packaging/kdviewer.spec).
# Slow (several minutes) and large: run by hand, not in CI. Afterwards install the launcher with
#   packaging/install_desktop.sh   (copies kdviewer.desktop and the icon into ~/.local/share)
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import PyInstaller" 2>/dev/null || pip install "pyinstaller>=6.0"
if [ ! -f resources/models/kermany_cxr/manifest.json ]; then
    echo "resources/models/kermany_cxr is missing: run python scripts/make_default_bundle.py first" >&2
    exit 1
fi
if [ ! -f resources/demo/cxr_demo/manifest.json ]; then
    echo "resources/demo/cxr_demo is missing: run python scripts/make_demo_assets.py first" >&2
    exit 1
fi

start=$(date +%s)
pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/kdviewer.spec
cp packaging/kdviewer.desktop dist/kdviewer/
cp resources/icons/kdviewer-256.png dist/kdviewer/kdviewer.png
end=$(date +%s)
echo "built dist/kdviewer in $((end - start)) s; size $(du -sh dist/kdviewer | cut -f1)"

packaging/smoke.sh dist/kdviewer/kdviewer
