"""Turn a run of training/recipes/nih_cxr14.yaml into the multi-label NIH bundle the viewer opens.

    python scripts/make_nih_bundle.py --train            # run the recipe first (~15 min on 2 busy CPU cores)
    python scripts/make_nih_bundle.py                    # runs/nih_cxr14/main/bundle -> runs/models/nih_cxr14
    kdviewer --model runs/models/nih_cxr14 IMAGE.png     # open it

What it adds to the exporter's bundle: the saliency layer of both nets moved to the last stride-16
block (a 4 x 4 map at 64 px instead of the head's 2 x 2); and one decision threshold per finding,
chosen on the **val** split (the split the bundle's metrics come from; there is no other labelled
set here) with the deployed student as the viewer runs it (ONNX Runtime, INT8 when the exporter
recommended it, the calibration temperature), stored in ``manifest.thresholds`` with the rule in
``threshold_rule``:

* F1: the threshold maximising the finding's F1 score on val (the harmonic mean of precision and
  sensitivity), among midpoints between neighbouring val probabilities. Youden's J (sensitivity +
  specificity - 1) was tried first: with findings of 2-24 % prevalence and a weak model it set most
  thresholds so low that a typical image listed 5-7 findings, which tells a reader nothing; F1 weighs
  the false alarms against the finds. Few val positives make either threshold noisy (the card says so).

Where it goes, and why not into git: the bundle (INT8 student ONNX 3.8 MB + student/teacher state dicts
for the saliency maps) does not fit the 40 MB budget of resources/ next to the default model (39.7 MiB
used), and it is not a model to open by default (research on 64 px images, see the model card). So it
is installed under ``runs/models/nih_cxr14`` (ignored by git), with the exporter's float32 state dicts
(float16 moved the teacher's probabilities by up to 0.04 on val here: not worth it outside the
budget) and the report left out; rerun this script to regenerate it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # training/kdviewer, and make_default_bundle's helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from make_default_bundle import run_bundle, stage_deployed  # noqa: E402

RECIPE = ROOT / "training" / "recipes" / "nih_cxr14.yaml"
TARGET = ROOT / "runs" / "models" / "nih_cxr14"
STUDENT_CAM_LAYER, TEACHER_CAM_LAYER = "blocks.10", "blocks.14"


def f1_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold maximising F1 = 2 TP / (2 TP + FP + FN) (ties: the lowest such threshold).

    Candidates are midpoints between consecutive distinct probabilities (and just below the lowest),
    so the threshold never sits exactly on a val case. Raises ValueError when ``y`` has one class only.
    """
    p = np.asarray(p, np.float64)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("a threshold needs both positives and negatives")
    u = np.unique(p)
    cands = np.concatenate([[max(u[0] - 1e-6, 1e-6)], (u[1:] + u[:-1]) / 2.0]) if len(u) > 1 else u
    called = p[None, :] >= cands[:, None]
    tp = (called & y).sum(1)
    fp = (called & ~y).sum(1)
    fn = (~called & y).sum(1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    t = float(cands[int(np.argmax(f1))])
    return float(min(max(t, 1e-4), 1.0 - 1e-4))


def val_probabilities(
    bundle: Path, run_config: Path | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The deployed student's probabilities (as the viewer computes them) and the targets on val."""
    from kdviewer.inference.predict import Classifier
    from training import ablate
    from training.config import load_config

    cfg = load_config(run_config or RECIPE)
    loader, names, _ = ablate.val_loader(cfg, 64)
    clf = Classifier(bundle, threads=1)
    if list(clf.class_names) != list(names):
        raise SystemExit(f"the bundle's classes {clf.class_names} are not the recipe's {names}")
    probs, targets = [], []
    for _, x, y in loader.iter_batches(0, 0, "cpu"):
        probs += [p.probabilities for p in clf.predict_batch(x.numpy())]
        targets.append(y.numpy())
    return np.stack(probs), np.concatenate(targets), list(names)


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, names: list[str]) -> dict[str, float]:
    return {n: round(f1_threshold(probs[:, k], targets[:, k]), 6) for k, n in enumerate(names)}


def install(bundle: Path, target: Path, thresholds: dict[str, float]) -> None:
    from kdviewer.models.bundle import open_bundle
    from kdviewer.models.manifest import Manifest
    from training.export import _model_card

    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        staged.mkdir()
        stage_deployed(bundle, staged, manifest)  # weights as they are (fp32: see the docstring)
        # Grad-CAM on the last stride-16 block (4 x 4 at 64 px, the maps attention transfer aligns) instead of
        # the head (stride 32: 2 x 2, where Grad-CAM of a weak finding is often all zero after the ReLU)
        manifest["student"]["target_layer"] = STUDENT_CAM_LAYER
        if manifest.get("teacher"):
            manifest["teacher"]["target_layer"] = TEACHER_CAM_LAYER
        manifest["thresholds"] = thresholds
        manifest["threshold_rule"] = (
            "per finding, the F1-maximising threshold of the deployed student on the val "
            f"split ({manifest.get('metrics_split') or 'val'}); few positives make it noisy"
        )
        manifest["schema_version"] = Manifest.model_fields["schema_version"].default
        m = Manifest.model_validate(manifest)
        (staged / "manifest.json").write_text(m.model_dump_json(indent=2) + "\n", encoding="utf-8")
        evaluation = json.loads((staged / "evaluation.json").read_text(encoding="utf-8"))
        card = _model_card(m, evaluation)
        card += "\n## Decision thresholds (chosen on val)\n\n" + m.threshold_rule + "\n\n"
        card += "| finding | threshold |\n|---|---|\n"
        card += "".join(f"| {k} | {v:.3f} |\n" for k, v in thresholds.items())
        (staged / "model_card.md").write_text(card, encoding="utf-8")
        open_bundle(staged).close()  # the installed bundle must open as it is
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "nih_cxr14" / "main")
    p.add_argument("--target", type=Path, default=TARGET)
    p.add_argument("--train", action="store_true", help="run the recipe into --run-dir first")
    args = p.parse_args(argv)
    bundle = run_bundle(RECIPE, args.run_dir, args.train)
    if bundle is None:
        return 2
    probs, targets, names = val_probabilities(bundle)
    thresholds = choose_thresholds(probs, targets, names)
    install(bundle, args.target, thresholds)
    print(f"installed {args.target} (open it: kdviewer --model {args.target})")
    print(f"{'finding':<20} {'val pos':>7} {'threshold':>9} {'sens':>5} {'spec':>5}")
    for k, n in enumerate(names):
        y = targets[:, k] > 0.5
        called = probs[:, k] >= thresholds[n]
        sens, spec = called[y].mean(), (~called[~y]).mean()
        print(f"{n:<20} {int(y.sum()):>7} {thresholds[n]:>9.3f} {sens:>5.2f} {spec:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
