"""Regenerate kdviewer's shipped demo assets: sample images and the demo model bundle.

    python scripts/make_demo_assets.py               # samples + bundle
    python scripts/make_demo_assets.py --samples-only
    python scripts/make_demo_assets.py --bundle-only [--quick]

Samples (resources/samples/), all synthetic phantoms from `training.synth`, labelled SYNTHETIC in the
file name and (for DICOM) in PatientName / SeriesDescription / ImageComments:

* ``cxr_synthetic.png``      an 8-bit chest radiograph phantom with consolidation (512 px),
* ``cxr_synthetic.dcm``      a 12-bit DX DICOM radiograph phantom (1024 px, 0.35 mm, fake "PHI"),
* ``ct_synthetic/``          a short chest CT series (8 slices of 256 px, HU, 5 mm apart).

Bundle (resources/demo/cxr_demo/): trained with our own engine — ``python -m training run
resources/demo/cxr_demo.yaml`` — in a scratch folder, then copied here. The recipe keeps everything in
resources/demo and resources/models under 40 MB together (checked at the end; the script fails above it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "resources"
SAMPLES = RESOURCES / "samples"
DEMO = RESOURCES / "demo"
RECIPE = DEMO / "cxr_demo.yaml"
BUDGET_MB = 40.0


def _cxr(seed: int, size: int, lesion: bool) -> np.ndarray:
    from training.synth import render_cxr

    img, _mask = render_cxr(np.random.default_rng(seed), 0.4, size, lesion)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def make_samples(out: Path = SAMPLES) -> list[Path]:
    """The three shipped sample cases, all phantoms from `training.synth` (SYNTHETIC in name and tags)."""
    from PIL import Image
    from pydicom.uid import generate_uid

    from training.synth import write_dx_dicom

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    png = out / "cxr_synthetic.png"
    Image.fromarray((_cxr(11, 512, True) * 255 + 0.5).astype(np.uint8)).save(png, optimize=True)
    written.append(png)

    dcm = out / "cxr_synthetic.dcm"
    write_dx_dicom(
        dcm,
        _cxr(12, 1024, True),
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        patient_id="KDVIEWER-SYNTH-0001",
        spacing_mm=0.35,
    )
    written.append(dcm)
    written += make_ct_series(out / "ct_synthetic")
    return written


def make_ct_series(folder: Path, n: int = 8, size: int = 256, seed: int = 21) -> list[Path]:
    """A short chest CT series (HU) with a severe lesion, 5 mm slices, as CT DICOM files."""
    from pydicom.uid import generate_uid

    from training.synth import render_ct_slice, write_ct_dicom

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for k in range(n):
        z = 5.0 * (k - (n - 1) / 2)
        # one case: the same generator state on every slice keeps anatomy and lesion consistent
        hu, _mask = render_ct_slice(np.random.default_rng(seed), 0.4, size, True, z, True)
        path = folder / f"slice_{k + 1:03d}.dcm"
        write_ct_dicom(
            path,
            hu,
            study_uid=study,
            series_uid=series,
            sop_uid=generate_uid(),
            patient_id="KDVIEWER-SYNTH-0002",
            z_mm=float(z),
            instance=k + 1,
        )
        written.append(path)
    return written


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def make_bundle(quick: bool = False, keep_scratch: bool = False, recipe: Path = RECIPE) -> Path:
    """Train the demo bundle with `python -m training run` and install it as resources/demo/cxr_demo."""
    scratch = Path(tempfile.mkdtemp(prefix="kdviewer-demo-"))
    cmd = [
        sys.executable,
        "-m",
        "training",
        "run",
        str(recipe),
        "--set",
        f"data.root={scratch / 'data'}",
        "--set",
        f"output.dir={scratch / 'run'}",
        "--events",
        str(scratch / "events.jsonl"),
    ]
    if quick:
        cmd += [
            "--set",
            "teacher.epochs=1",
            "--set",
            "optim.epochs=1",
            "--set",
            "data.generate.n=120",
            "--set",
            "output.bootstrap=50",
        ]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    bundle = scratch / "run" / "bundle"
    if proc.returncode != 0 or not (bundle / "manifest.json").is_file():
        raise SystemExit(f"training failed (exit {proc.returncode}); scratch kept at {scratch}")
    target = DEMO / "cxr_demo"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target)
    # report.html and evaluation files stay (they are the model card's evidence) unless they are large
    for extra in target.glob("*.html"):
        if extra.stat().st_size > 2_000_000:
            extra.unlink()
    if not keep_scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def check_budget() -> float:
    """All bundled models (the real default model in resources/models and the demo) share the budget."""
    models = DEMO.parent / "models"
    total = folder_mb(DEMO) + (folder_mb(models) if models.is_dir() else 0.0)
    print(f"resources/demo + resources/models total: {total:.1f} MB (budget {BUDGET_MB:.0f} MB)")
    for f in sorted(DEMO.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(DEMO)}  {f.stat().st_size / 1e6:.2f} MB")
    if total > BUDGET_MB:
        raise SystemExit(f"demo bundles are {total:.1f} MB > {BUDGET_MB:.0f} MB")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples-only", action="store_true")
    ap.add_argument("--bundle-only", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="1 epoch on 120 images (a smoke run, not for shipping)"
    )
    ap.add_argument("--keep-scratch", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if not args.bundle_only:
        for p in make_samples():
            print(f"wrote {p.relative_to(ROOT)}")
    if not args.samples_only:
        target = make_bundle(quick=args.quick, keep_scratch=args.keep_scratch)
        print(f"installed {target.relative_to(ROOT)}")
        check_budget()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
