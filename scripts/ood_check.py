"""How often the OOD guard of a bundle fires on in-distribution cases and on things it must not answer.

    python scripts/ood_check.py                                   # the default model (kermany_cxr)
    python scripts/ood_check.py --bundle runs/x/bundle --json ood.json

Every image goes the viewer's way: ``kdviewer.imaging.load`` -> the bundle's preprocessing -> the deployed
student (ONNX Runtime) -> the OOD score; the modality gate is *not* applied here (a CT slice is scored
as if it came in a PNG), so the numbers are the guard's own. Sets:

* ``val``: the recipe's patient-wise val split (in distribution: the guard should stay quiet);
* ``ct``: real chest CT slices (../shared/data/real-ct-dicom) and synthetic CT phantom slices;
* ``non-chest``: photographs shipped with scikit-learn (china.jpg, flower.jpg) and crops of them, plus
  generated geometric pictures (gradients, checkerboards, discs);
* ``noise``: uniform, Gaussian, salt-and-pepper and smooth (blurred) noise images;
* ``adult-cxr`` and ``nih-cxr14``: real radiographs of another population (reported, no target).

Prints one line per set (n, flagged, rate) and ``RESULT`` lines for the two targets of the real-model
issue: flag rate on val <= 5%, and on CT + non-chest + noise >= 95%.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
RECIPE = ROOT / "training" / "recipes" / "kermany_cxr.yaml"


def noise_images(n: int, seed: int = 0) -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.choice([224, 512, 1024]))
        kind = i % 4
        if kind == 0:
            img = rng.uniform(0, 255, (size, size))
        elif kind == 1:
            img = np.clip(rng.normal(128, 40, (size, size)), 0, 255)
        elif kind == 2:
            img = np.where(rng.random((size, size)) < 0.5, 0.0, 255.0)
        else:
            img = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 40)
            img = 255 * (img - img.min()) / (np.ptp(img) + 1e-9)
        out.append(img.astype(np.uint8))
    return out


def pictures(seed: int = 0) -> list[np.ndarray]:
    """Non-chest pictures: scikit-learn's two photographs (whole and cropped) and geometric drawings."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out: list[np.ndarray] = []
    for photo in load_sample_images().images:
        gray = np.asarray(Image.fromarray(photo).convert("L"))
        h, w = gray.shape
        out.append(gray)
        out += [
            gray[: h // 2, : w // 2],
            gray[h // 2 :, w // 2 :],
            gray[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4],
        ]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512]
    for i in range(12):
        kind = i % 3
        if kind == 0:
            angle = rng.uniform(0, np.pi)
            img = (np.cos(angle) * xx + np.sin(angle) * yy) % 512 / 2
        elif kind == 1:
            step = int(rng.integers(16, 96))
            img = ((xx // step + yy // step) % 2) * 255.0
        else:
            img = np.zeros((512, 512))
            for _ in range(6):
                cx, cy = rng.integers(0, 512, 2).tolist()
                r = int(rng.integers(20, 120))
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(60, 255)
        out.append(img.astype(np.uint8))
    return out


def ct_paths(tmp: Path) -> list[Path]:
    from training.synth import generate

    real = sorted((SHARED / "real-ct-dicom").glob("*.dcm"))
    synth_root = Path(generate("ct", 8, tmp / "ct", fmt="dicom", seed=0, size=256))
    synth = sorted(p for p in synth_root.rglob("*.dcm"))
    return real + synth


def scores(clf, studies) -> tuple[int, int, list[float]]:
    """(n cases, n flagged, scores) — each study preprocessed and scored as the viewer does."""
    flagged, vals, n = 0, [], 0
    for study in studies:
        batch, _ = clf.preprocess(study, "middle")
        pred = clf.predict_batch([batch])[0]
        n += 1
        vals.append(float(pred.ood_score))
        flagged += bool(pred.ood_flag)
    return n, flagged, vals


def _arrays_as_studies(arrays: list[np.ndarray], tmp: Path, name: str):
    from PIL import Image

    from kdviewer.imaging import load

    for i, a in enumerate(arrays):
        p = tmp / f"{name}_{i:03d}.png"
        Image.fromarray(a).save(p)
        yield load(p)


def main(argv: list[str] | None = None) -> int:
    from kdviewer.imaging import load
    from kdviewer.inference.predict import Classifier
    from kdviewer.models.bundle import default_bundle_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--val-limit", type=int, default=None, help="score only the first N val images")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bundle = args.bundle or default_bundle_path()
    clf = Classifier(bundle)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ood-check-") as tmp_s:
        tmp = Path(tmp_s)
        from training import ablate
        from training.config import load_config

        _, _, val_paths = ablate.val_loader(load_config(RECIPE), 64)
        val_paths = val_paths[: args.val_limit] if args.val_limit else val_paths
        sets = {
            "val": (load(q) for q in val_paths),
            "ct": (load(q) for q in ct_paths(tmp)),
            "non-chest": _arrays_as_studies(pictures(), tmp, "pic"),
            "noise": _arrays_as_studies(noise_images(40), tmp, "noise"),
        }
        adult = SHARED / "real-cxr"
        if adult.is_dir():
            with open(adult / "labels.csv", encoding="utf-8", newline="") as fh:
                adult_rows = list(csv.DictReader(fh))
            sets["adult-cxr"] = (load(adult / r["path"]) for r in adult_rows)
        nih = SHARED / "nih-cxr14-1000"
        if nih.is_dir():
            with open(nih / "labels.csv", encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))[:200]
            sets["nih-cxr14"] = (load(nih / r["path"]) for r in rows)
        for name, studies in sets.items():
            n, k, vals = scores(clf, studies)
            results[name] = {
                "n": n,
                "flagged": k,
                "rate": k / max(1, n),
                "median_score": float(np.median(vals)),
            }
            rate = k / max(1, n)
            print(f"{name:10s} n={n:5d} flagged={k:5d} rate={rate:.3f} median score {np.median(vals):.1f}")
    off = [results[s] for s in ("ct", "non-chest", "noise")]
    off_rate = sum(r["flagged"] for r in off) / sum(r["n"] for r in off)
    results["threshold"] = {"value": float(clf.manifest.ood.threshold) if clf.manifest.ood else float("nan")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"RESULT ood_val_rate {results['val']['rate']:.4f}")
    print(f"RESULT ood_off_distribution_rate {off_rate:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
