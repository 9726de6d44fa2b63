#!/usr/bin/env bash
# First run on a fresh machine: the system libraries Qt needs (Debian/Ubuntu), then a virtual
# environment with kdviewer installed. Safe to rerun; installs only what is missing.
#
#   scripts/setup.sh               system libraries + .venv + pip install -e .
#   scripts/setup.sh --test        ... with the test extra (pytest, ruff)
#   scripts/setup.sh --system-only only the system libraries (what .ci/run uses)
#   scripts/setup.sh --check       only say which system libraries are missing (exit 1 if any)
#
# The package list is kdviewer/system-packages.txt (first column), the same list `kdviewer` reads to
# name the missing packages when Qt cannot start. Without root or sudo, the script prints the exact
# command to run and exits non-zero after setting up the Python side.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
extra=""
for arg in "$@"; do
  case "$arg" in
    --test) extra="[test]" ;;
    --system-only) mode=system ;;
    --check) mode=check ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

LIST=kdviewer/system-packages.txt
mapfile -t PACKAGES < <(sed -e 's/#.*//' "$LIST" | awk 'NF {print $1}')
read -r -a EXTRA_PACKAGES <<< "${SETUP_EXTRA_PACKAGES:-}"  # e.g. "xvfb" for CI screenshots

missing_packages() {
  local p
  for p in "${PACKAGES[@]}" ${EXTRA_PACKAGES[@]+"${EXTRA_PACKAGES[@]}"}; do
    [ -n "$p" ] || continue
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      echo "$p"
    fi
  done
}

system_status=0
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not a Debian/Ubuntu system (no apt-get); install your distribution's packages for:"
  echo "  ${PACKAGES[*]}"
else
  mapfile -t MISSING < <(missing_packages)
  if [ "${#MISSING[@]}" -eq 0 ]; then
    echo "setup: system libraries for Qt: all ${#PACKAGES[@]} installed"
  elif [ "$mode" = check ]; then
    echo "setup: missing system packages: ${MISSING[*]}"
    echo "  install them with: sudo apt-get install -y ${MISSING[*]}"
    exit 1
  else
    SUDO=()
    if [ "$(id -u)" != "0" ]; then
      if command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
        SUDO=(sudo)
      else
        SUDO=(none)
      fi
    fi
    if [ "${SUDO[*]}" = none ]; then
      echo "setup: these system packages are missing and this script cannot install them (not root, no sudo):"
      echo "  ${MISSING[*]}"
      echo "  ask an administrator to run: apt-get install -y ${MISSING[*]}"
      system_status=1
    else
      echo "setup: installing ${#MISSING[@]} system package(s): ${MISSING[*]}"
      export DEBIAN_FRONTEND=noninteractive
      "${SUDO[@]}" apt-get update -qq >/dev/null || echo "setup: warning: apt-get update failed; trying anyway"
      if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null; then
        # one unknown name (an older/newer release) must not block the others
        for p in "${MISSING[@]}"; do
          "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 || true
        done
      fi
      mapfile -t STILL < <(missing_packages)
      if [ "${#STILL[@]}" -gt 0 ]; then
        echo "setup: could not install: ${STILL[*]} (not in this release's archive?)"
        echo "  try: sudo apt-get install -y ${STILL[*]}"
        system_status=1
      else
        echo "setup: system libraries installed"
      fi
    fi
  fi
fi

if [ "$mode" = check ]; then exit 0; fi
if [ "$mode" = system ]; then exit "$system_status"; fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || {
    echo "setup: python3 -m venv failed; on Debian/Ubuntu: sudo apt-get install -y python3-venv" >&2
    exit 1
  }
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -e ".${extra}"
echo "setup: kdviewer installed in .venv (activate with: . .venv/bin/activate)"
if [ "$system_status" != 0 ]; then
  echo "setup: the viewer needs the system packages above before it can open a window" >&2
fi
exit "$system_status"
