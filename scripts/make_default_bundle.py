"""Install the default model — a run of training/recipes/kermany_cxr.yaml — as resources/models/kermany_cxr.

    python scripts/make_default_bundle.py --train          # run the recipe first (~1 h on 2 CPU cores)
    python scripts/make_default_bundle.py                  # install runs/kermany_cxr/main/bundle

What is shipped, to keep everything under resources/ (this bundle + the synthetic demo) within 40 MB:

* the INT8 student ONNX file the viewer runs (only when the exporter's parity check recommended it;
  otherwise the fp32 ONNX file is shipped instead),
* ``student.pt`` and ``teacher.pt`` stored as float16 (half the bytes; loaded back into float32
  models). The script measures what that costs on val images and refuses to install when any
  probability moves by more than ``--max-dp``,
* ``ood.npz``, ``model_card.md``, ``evaluation.json`` and ``history.json``; the HTML report goes to
  ``docs/results/kermany_cxr_report.html`` instead (the bundle stays within the size budget).

``--sample`` also picks the viewer's sample case, ``resources/samples/cxr_kermany_sample.jpeg``: a val-split
radiograph (never a training image) of the positive class that the installed student and teacher both
classify correctly and agree on, with no OOD flag — so that a first look shows the product working on a
case of the population it was built for. It is a sample, not evidence: the numbers are in the model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "training" / "recipes" / "kermany_cxr.yaml"
TARGET = ROOT / "resources" / "models" / "kermany_cxr"
BUDGET_BYTES = 40 * 1024**2
COPY = ("manifest.json", "model_card.md", "evaluation.json", "history.json", "ood.npz")
REPORT_COPY = ROOT / "docs" / "results" / "kermany_cxr_report.html"


def run_bundle(recipe: Path, run_dir: Path, train: bool) -> Path | None:
    """``run_dir``'s bundle, after running ``recipe`` into it when ``train``; None (with the reason on
    stderr) when there is none."""
    if train:
        cmd = [sys.executable, "-m", "training", "run", str(recipe), "--set", f"output.dir={run_dir}"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    bundle = run_dir / "bundle"
    if not (bundle / "manifest.json").is_file():
        print(f"no bundle at {bundle}: run with --train (or kd-train run {recipe})", file=sys.stderr)
        return None
    return bundle


def half_state_dict(src: Path, dst: Path) -> None:
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, dst)


def stage_deployed(
    bundle: Path, staged: Path, manifest: dict, copy_weights: Callable[[Path, Path], object] = shutil.copy2
) -> None:
    """Copy into ``staged`` what a shipped bundle needs of the run's ``bundle``: the ``COPY`` files, the one
    student ONNX file the viewer deploys (INT8 where its parity check recommended it, else fp32; the
    other is dropped from ``manifest``) and the weights of both models through ``copy_weights``."""
    student = manifest["student"]
    int8_ok = bool(student.get("onnx_int8")) and manifest.get("int8_parity", {}).get("recommended", 0) >= 1
    for name in COPY:
        if (bundle / name).is_file():
            shutil.copy2(bundle / name, staged / name)
    if int8_ok:
        shutil.copy2(bundle / student["onnx_int8"], staged / student["onnx_int8"])
        student["onnx"] = None
    else:
        shutil.copy2(bundle / student["onnx"], staged / student["onnx"])
        student["onnx_int8"] = None
    for role in ("student", "teacher"):
        spec = manifest.get(role) or {}
        if spec.get("weights"):
            copy_weights(bundle / spec["weights"], staged / spec["weights"])


def install(bundle: Path, target: Path, max_dp: float) -> dict[str, float]:
    from kdviewer.models.bundle import open_bundle

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        staged = Path(tmp) / target.name
        staged.mkdir()
        stage_deployed(bundle, staged, manifest, half_state_dict)
        refresh_card(manifest, staged)
        open_bundle(staged).close()  # the shipped bundle must open as it is
        drift = weight_drift(bundle, staged)
        if max(drift.values()) > max_dp:
            raise SystemExit(f"float16 weights move probabilities by {drift} > {max_dp}: not installed")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), target)
    return drift


def refresh_card(manifest: dict, staged: Path) -> None:
    """Write manifest + model card with the recipe's current ``output.card`` (source, population, limits)."""
    from kdviewer.models.manifest import Manifest
    from training.config import load_config
    from training.export import _model_card

    card = load_config(RECIPE).output.card.model_dump(mode="json")
    config = manifest.setdefault("training", {}).setdefault("config", {})
    config.setdefault("output", {})["card"] = card
    if card.get("intended_use"):
        manifest["intended_use"] = card["intended_use"]
    m = Manifest.model_validate(manifest)
    (staged / "manifest.json").write_text(m.model_dump_json(indent=2) + "\n", encoding="utf-8")
    evaluation = json.loads((staged / "evaluation.json").read_text(encoding="utf-8"))
    (staged / "model_card.md").write_text(_model_card(m, evaluation), encoding="utf-8")


def weight_drift(full: Path, shipped: Path, n: int = 128) -> dict[str, float]:
    """Max |Δp| between the float32 and the float16-stored torch models on ``n`` val images."""
    import torch

    from kdviewer.models.bundle import open_bundle
    from training import ablate
    from training.config import load_config

    loader, _, _ = ablate.val_loader(load_config(RECIPE, [f"data.limit={n}"]), 64)
    out = {}
    for role in ("student", "teacher"):
        a, b = open_bundle(full).build_torch(role).eval(), open_bundle(shipped).build_torch(role).eval()
        diffs = []
        with torch.inference_mode():
            for _, x, _ in loader.iter_batches(0, 0, "cpu"):
                diffs.append((a(x).softmax(1) - b(x).softmax(1)).abs().max().item())
        out[role] = float(np.max(diffs))
    return out


def pick_sample(target: Path, out: Path) -> Path:
    """Copy a val radiograph that both installed models get right, agree on and do not flag (see above)."""
    from kdviewer.imaging import load
    from kdviewer.inference.predict import Classifier
    from training import ablate
    from training.config import load_config

    clf = Classifier(target, load_teacher=True)
    positive = clf.manifest.positive_class or clf.class_names[-1]
    _, _, paths = ablate.val_loader(load_config(RECIPE), 64)
    for path in paths:
        if positive not in path.parts:
            continue
        comp = clf.compare(load(path))
        s, t = comp.student, comp.teacher
        if s.label == t.label == positive and min(s.probability, t.probability) > 0.9 and not s.ood_flag:
            shutil.copyfile(path, out)
            return path
    raise SystemExit("no val case fits the sample criteria")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "kermany_cxr" / "main")
    p.add_argument("--train", action="store_true", help="run the recipe into --run-dir first")
    p.add_argument("--max-dp", type=float, default=0.01, help="largest probability change allowed by fp16")
    p.add_argument("--sample", action="store_true", help="also pick the viewer's sample case (see above)")
    args = p.parse_args(argv)
    bundle = run_bundle(RECIPE, args.run_dir, args.train)
    if bundle is None:
        return 2
    drift = install(bundle, TARGET, args.max_dp)
    if (bundle / "report.html").is_file():
        shutil.copyfile(bundle / "report.html", REPORT_COPY)
    shipped = [q for d in ("models", "demo") for q in (ROOT / "resources" / d).rglob("*") if q.is_file()]
    total = sum(q.stat().st_size for q in shipped)
    print(f"installed {TARGET}; fp16 weights: max |Δp| {drift}")
    if args.sample:
        src = pick_sample(TARGET, ROOT / "resources" / "samples" / "cxr_kermany_sample.jpeg")
        print(f"sample case: {src}")
    print(f"resources/models + resources/demo: {total / 2**20:.1f} MB")
    if total > BUDGET_BYTES:
        print(f"over the {BUDGET_BYTES / 2**20:.0f} MB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
