#!/usr/bin/env bash
# Register the built app with the desktop: a launcher in ~/.local/share/applications, the icon, and a
# `kdviewer` link in ~/.local/bin pointing at dist/kdviewer/kdviewer.
set -euo pipefail
cd "$(dirname "$0")/.."
APP_DIR="$(pwd)/dist/kdviewer"
[ -x "$APP_DIR/kdviewer" ] || { echo "build first: packaging/build.sh" >&2; exit 1; }
mkdir -p ~/.local/bin ~/.local/share/applications ~/.local/share/icons/hicolor/256x256/apps \
         ~/.local/share/icons/hicolor/scalable/apps
ln -sf "$APP_DIR/kdviewer" ~/.local/bin/kdviewer
cp resources/icons/kdviewer-256.png ~/.local/share/icons/hicolor/256x256/apps/kdviewer.png
cp resources/icons/kdviewer.svg ~/.local/share/icons/hicolor/scalable/apps/kdviewer.svg
sed "s|^Exec=kdviewer|Exec=$APP_DIR/kdviewer|" packaging/kdviewer.desktop > ~/.local/share/applications/kdviewer.desktop
command -v update-desktop-database >/dev/null && update-desktop-database ~/.local/share/applications || true
echo "installed launcher for $APP_DIR/kdviewer"
