"""`generate`: write a SYNTHETIC image-folder dataset (images, lesion masks, labels.csv), and its CLI."""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, PngImagePlugin

from .ct import CT_FOV_MM, CtAnatomy, Pattern, ct_anatomy, ct_case, render_ct
from .cxr import CxrAnatomy, cxr_anatomy, cxr_phantom
from .dicom import CXR_FOV_MM, ct_stored_values, synthetic_uid, write_ct_dicom, write_dx_dicom

__all__ = ["CSV_COLUMNS", "CT_CLASSES", "CXR_CLASSES", "SLICE_MM", "add_cli", "generate"]

log = logging.getLogger(__name__)

CXR_CLASSES = ("normal", "pneumonia")
CT_CLASSES = ("mild", "severe")
#: Slice thickness and spacing (mm) of CT cases; series slices are contiguous.
SLICE_MM = 5.0
CSV_COLUMNS = (
    "path", "label", "patient_id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "mask_path",
    "case_id", "has_lesion", "lesion_pixels", "slices",
)
_KIND_CODE = {"cxr": 1, "ct": 2}
_MARKER = "SYNTHETIC.txt"
_PNG_LEVEL = 3  # zlib level: fast; files are a little larger than at the default 6


@dataclass
class _Case:
    index: int
    case_id: str
    label: str
    positive: bool
    patient: int
    patient_id: str


def _plan(kind: str, n: int, seed: int, n_patients: int) -> list[_Case]:
    """Balanced labels and patient assignment (every patient gets >= 1 case), deterministic per seed."""
    rng = np.random.default_rng([seed, _KIND_CODE[kind], 0])
    positive = np.zeros(n, dtype=bool)
    positive[rng.permutation(n)[: n // 2]] = True
    order = rng.permutation(n)
    patient = np.empty(n, dtype=np.int64)
    patient[order[:n_patients]] = np.arange(n_patients)
    patient[order[n_patients:]] = rng.integers(0, n_patients, n - n_patients)
    classes = CXR_CLASSES if kind == "cxr" else CT_CLASSES
    return [
        _Case(
            index=i,
            case_id=f"phantom-{kind}-s{seed}-{i:05d}",
            label=classes[int(positive[i])],
            positive=bool(positive[i]),
            patient=int(patient[i]),
            patient_id=f"KDVIEWER-SYNTH-{kind.upper()}-S{seed}-P{int(patient[i]):04d}",
        )
        for i in range(n)
    ]


def _png_info(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", text)
    return info


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, compress_level=_PNG_LEVEL)


def _bbox(mask: np.ndarray) -> list[str]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return ["", "", "", ""]
    cols = np.flatnonzero(mask.any(axis=0))
    return [str(int(cols[0])), str(int(rows[0])), str(int(cols[-1]) + 1), str(int(rows[-1]) + 1)]


def _prepare(out: Path, kind: str) -> None:
    """Make `out` ready: refuse to mix with foreign files; replace an earlier synthetic dataset."""
    ours = [out / c for c in (*CXR_CLASSES, *CT_CLASSES)] + [out / "masks", out / "labels.csv"]
    if (out / _MARKER).is_file():
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    else:
        busy = [p for p in ours if p.is_file() or (p.is_dir() and any(p.iterdir()))]
        if busy:
            raise FileExistsError(
                f"{out} already holds {', '.join(p.name for p in busy)} and is not a synthetic dataset "
                f"(no {_MARKER}); choose an empty folder"
            )
    out.mkdir(parents=True, exist_ok=True)


def generate(
    kind: Literal["cxr", "ct"],
    n: int,
    out: str | Path,
    fmt: Literal["png", "dicom"] = "png",
    seed: int = 0,
    difficulty: float = 0.5,
    size: int | None = None,
    series_slices: int = 1,
    patients: int | None = None,
) -> Path:
    """Write `n` SYNTHETIC cases as an image-folder dataset under `out` and return `out`.

    Layout (paths in labels.csv are POSIX and relative to `out`)::

        <class>/<case_id>.png|.dcm            one image per case
        <class>/<case_id>/slice_NNN.dcm|.png  ct with series_slices > 1: one folder (series) per case
        masks/<case_id>.png                   lesion mask, 0/255, same geometry; union over the slices
        masks/<case_id>/slice_NNN.png         ct series: one mask per slice
        labels.csv                            see CSV_COLUMNS
        SYNTHETIC.txt                         says that all of this is synthetic, with the parameters

    Classes: cxr `normal` / `pneumonia`; ct `mild` / `severe` (n // 2 positives: pneumonia / severe).
    CSV: bbox_x0, bbox_y0, bbox_x1, bbox_y1 is the lesion union in pixels, x1/y1 exclusive (so
    ``mask[y0:y1, x0:x1]`` holds every lesion pixel), all four empty when there is no lesion;
    has_lesion is 1/0 (pneumonia and severe always 1; mild cases carry a small focus about half the
    time); lesion_pixels counts mask pixels over all slices; slices is the number of images in the case.
    `patients` synthetic patients (default n // 2) share the cases, every patient at least one; cases
    of one patient share that patient's anatomy, so splits must be patient-wise.
    cxr: 8-bit PNG or 12-bit DX DICOM (MONOCHROME2). ct: CT DICOM with stored = HU + 1024 and
    RescaleIntercept -1024, or 16-bit PNG holding HU + 1024. Pixel spacing: 400 mm (cxr) or
    360 mm (ct) / size. Same arguments, same bytes.
    """
    if kind not in ("cxr", "ct"):
        raise ValueError(f"kind must be 'cxr' or 'ct', not {kind!r}")
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt must be 'png' or 'dicom', not {fmt!r}")
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    size = 256 if size is None else int(size)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if int(series_slices) < 1:
        raise ValueError(f"series_slices must be at least 1, got {series_slices}")
    if kind == "cxr" and series_slices != 1:
        raise ValueError("series_slices applies to ct only (a radiograph is a single image)")
    n, seed, series_slices, difficulty = int(n), int(seed), int(series_slices), float(difficulty)
    n_patients = max(1, n // 2) if patients is None else int(patients)
    if not 1 <= n_patients <= n:
        raise ValueError(f"patients must be between 1 and n ({n}), got {patients}")

    out = Path(out)
    _prepare(out, kind)
    ext = "dcm" if fmt == "dicom" else "png"
    params = (kind, n, fmt, seed, difficulty, size, series_slices, n_patients)
    plan = _plan(kind, n, seed, n_patients)
    rows: list[list[str]] = []
    for case in plan:
        # one anatomy per synthetic patient: drawn from the patient's own stream, so it is the same
        # whichever of the patient's cases comes first
        prng = np.random.default_rng([seed, _KIND_CODE[kind], 1, case.patient])
        study_uid = synthetic_uid(*params, case.case_id, "study")
        series_uid = synthetic_uid(*params, case.case_id, "series")
        if kind == "cxr":
            image, mask = _render_cxr_case(case, cxr_anatomy(prng, difficulty), seed, difficulty, size)
            rel = f"{case.label}/{case.case_id}.{ext}"
            if fmt == "png":
                (out / case.label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.rint(image * 255).astype(np.uint8), mode="L").save(
                    out / rel, compress_level=_PNG_LEVEL,
                    pnginfo=_png_info("SYNTHETIC chest radiograph phantom (kdviewer training.synth)"))
            else:
                write_dx_dicom(out / rel, image, study_uid=study_uid, series_uid=series_uid,
                               sop_uid=synthetic_uid(*params, case.case_id, "sop", 0),
                               patient_id=case.patient_id, spacing_mm=CXR_FOV_MM / size)
            masks = [mask]
            has_lesion = case.positive
        else:
            slices, masks, z_list, has_lesion = _render_ct_case(case, ct_anatomy(prng, difficulty), seed,
                                                                difficulty, size, series_slices)
            single = series_slices == 1
            rel = f"{case.label}/{case.case_id}.{ext}" if single else f"{case.label}/{case.case_id}"
            frame_uid = synthetic_uid(*params, case.case_id, "frame")
            for k, (hu, z) in enumerate(zip(slices, z_list, strict=True)):
                rel_k = rel if single else f"{rel}/slice_{k:03d}.{ext}"
                if fmt == "dicom":
                    write_ct_dicom(out / rel_k, hu, study_uid=study_uid, series_uid=series_uid,
                                   sop_uid=synthetic_uid(*params, case.case_id, "sop", k),
                                   patient_id=case.patient_id, z_mm=z, instance=k + 1,
                                   spacing_mm=CT_FOV_MM / size, thickness_mm=SLICE_MM, frame_uid=frame_uid)
                else:
                    (out / rel_k).parent.mkdir(parents=True, exist_ok=True)
                    stored = ct_stored_values(hu).astype(np.uint16)  # HU + 1024, never negative
                    note = f"SYNTHETIC chest CT phantom (kdviewer training.synth); HU = value - 1024, z={z:g}"
                    info = _png_info(note)
                    Image.fromarray(stored).save(out / rel_k, compress_level=_PNG_LEVEL, pnginfo=info)
            if not single:
                for k, m in enumerate(masks):
                    _save_mask(m, out / "masks" / case.case_id / f"slice_{k:03d}.png")
        union = np.logical_or.reduce(masks)
        mask_rel = f"masks/{case.case_id}.png"
        _save_mask(union, out / mask_rel)
        rows.append([rel, case.label, case.patient_id, *_bbox(union), mask_rel, case.case_id,
                     str(int(has_lesion)), str(int(sum(int(m.sum()) for m in masks))), str(len(masks))])

    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    (out / _MARKER).write_text(
        "SYNTHETIC DATA - every image in this folder is a computer-generated chest phantom made by\n"
        "kdviewer's training.synth. No patient data. Not for clinical use: results on it say nothing\n"
        "about real patients.\n"
        f"kind={kind} n={n} format={fmt} seed={seed} difficulty={difficulty:g} size={size} "
        f"series_slices={series_slices} patients={n_patients}\n"
        "labels.csv: path,label,patient_id,bbox_x0,bbox_y0,bbox_x1,bbox_y1 (lesion union in pixels, x1/y1\n"
        "exclusive, empty when no lesion),mask_path (0/255 PNG),case_id,has_lesion,lesion_pixels,slices\n",
        encoding="utf-8",
    )
    log.info("wrote %d synthetic %s cases to %s", n, kind, out)
    return out


def _render_cxr_case(case: _Case, anatomy: CxrAnatomy, seed: int, difficulty: float,
                     size: int) -> tuple[np.ndarray, np.ndarray]:
    for attempt in range(20):
        rng = np.random.default_rng([seed, _KIND_CODE["cxr"], 2, case.index, attempt])
        p = cxr_phantom(rng, difficulty, size, lesion=case.positive, anatomy=anatomy)
        if not case.positive or p.lesion.any():
            return p.image, p.lesion
    raise RuntimeError(f"could not place a visible lesion in {case.case_id} at {size} px")  # pragma: no cover


def _render_ct_case(case: _Case, anatomy: CtAnatomy, seed: int, difficulty: float, size: int,
                    k_slices: int) -> tuple[list[np.ndarray], list[np.ndarray], list[float], bool]:
    """Slices (HU), masks, slice levels and whether the case carries a lesion."""
    code = _KIND_CODE["ct"]
    plan_rng = np.random.default_rng([seed, code, 2, case.index])
    if case.positive:
        pattern: Pattern = "severe"
    else:
        pattern = "mild" if plan_rng.random() < 0.5 else "none"
    z0 = float(plan_rng.uniform(-30.0, 30.0))
    z_list = [round(z0 + SLICE_MM * (k - (k_slices - 1) / 2.0), 3) for k in range(k_slices)]
    slab = (min(z_list) - 0.4 * SLICE_MM, max(z_list) + 0.4 * SLICE_MM)
    for attempt in range(20):
        rng = np.random.default_rng([seed, code, 3, case.index, attempt])
        ct = ct_case(rng, difficulty, pattern, anatomy=anatomy, z_range=slab)
        rendered = [render_ct(ct, size, z, np.random.default_rng([seed, code, 4, case.index, k]))
                    for k, z in enumerate(z_list)]
        masks = [r.lesion for r in rendered]
        if pattern == "none" or any(m.any() for m in masks):
            return [r.hu for r in rendered], masks, z_list, pattern != "none"
    # a lesion too small to cover a pixel at this size (tiny images): report the case as lesion-free
    if pattern == "mild":
        ct = ct_case(np.random.default_rng([seed, code, 3, case.index]), difficulty, "none", anatomy=anatomy)
        rendered = [render_ct(ct, size, z, np.random.default_rng([seed, code, 4, case.index, k]))
                    for k, z in enumerate(z_list)]
        return [r.hu for r in rendered], [r.lesion for r in rendered], z_list, False
    raise RuntimeError(f"could not place a visible lesion in {case.case_id} at {size} px")  # pragma: no cover


# ------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``synth``: ``--kind cxr|ct --n N --out DIR [--format png|dicom] [--seed S]
    [--difficulty D] [--size PX] [--series-slices K] [--patients P]``."""
    p = subparsers.add_parser(
        "synth",
        help="write a SYNTHETIC chest phantom dataset (cxr: normal/pneumonia, ct: mild/severe)",
        description="Write a SYNTHETIC chest phantom dataset: class folders, lesion masks, labels.csv.",
    )
    p.add_argument("--kind", choices=["cxr", "ct"], required=True, help="radiograph or CT phantoms")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--out", type=Path, required=True, help="output folder (empty or an earlier synth folder)")
    p.add_argument("--format", dest="fmt", choices=["png", "dicom"], default="png", help="file format")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--difficulty", type=float, default=0.5,
                   help="0 easy .. 1 hard: fainter, smaller lesions, more noise and anatomical variation")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    p.add_argument("--series-slices", type=int, default=1, help="ct only: contiguous slices per case")
    p.add_argument("--patients", type=int, default=None, help="distinct synthetic patients (default n // 2)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        out = generate(args.kind, args.n, args.out, args.fmt, args.seed, args.difficulty, args.size,
                       args.series_slices, args.patients)
    except (ValueError, FileExistsError) as exc:
        print(f"kd-train synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} SYNTHETIC {args.kind} cases ({args.fmt}) to {out}")
    return 0
