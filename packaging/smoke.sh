#!/usr/bin/env bash
# Smoke test of a built (or installed) kdviewer: `render` a shipped sample headlessly with the demo
# bundle, the teacher and Grad-CAM, check the PNG, and report the wall time.
#
#   packaging/smoke.sh [path/to/kdviewer]   (default: dist/kdviewer/kdviewer)
set -euo pipefail
cd "$(dirname "$0")/.."
APP="${1:-dist/kdviewer/kdviewer}"
OUT="$(mktemp -d)/smoke.png"
SAMPLE="resources/samples/cxr_synthetic.dcm"

export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}"
start=$(python3 -c "import time; print(time.time())")
"$APP" render "$SAMPLE" -o "$OUT" --teacher --saliency gradcam
end=$(python3 -c "import time; print(time.time())")
python3 - "$OUT" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read(32)
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
assert w >= 800 and h >= 600, (w, h)
print(f"smoke OK: {sys.argv[1]} {w}x{h}")
PY
python3 -c "print(f'render wall time (start-up + model load + inference + saliency): {$end - $start:.1f} s')"
"$APP" --help >/dev/null && echo "--help OK"
