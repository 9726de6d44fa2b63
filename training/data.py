"""Datasets for training: image folders or CSV files -> splits -> cached, preprocessed tensors -> batches.

* Discovery (`discover`): ``root/{train,val,test}/<class>/*`` folders, one ``root/<class>/*`` pool, or a
  CSV (``path,label[,patient_id][,split]``; multi-label labels joined by ``|``). Files are PNG/JPEG/
  TIFF/DICOM (and sub-folders of DICOM slices, one case each); every one is read with
  `kdviewer.imaging.load` and turned into model input with `kdviewer.models.preprocess.preprocess_frame`,
  the function the viewer uses too (volumes: the middle slice).
* Splits: as the folders / CSV ``split`` column say, random (stratified per class, by seed) or
  patient-wise (whole patients per split: no patient in two splits).
* Caching: decoding + preprocessing is the bottleneck on a CPU, so when the split fits in
  ``data.cache_max_mb`` it is decoded once into one float16 (or float32) tensor and every epoch slices
  batches out of it. Augmentation (`augment_batch`: rotation, h-flip, random resized crop as one affine
  warp) runs on the batch tensors *after* the cache, on the training device.
* Grayscale stays one channel end to end (``preprocessing.channels = 1``).
* `BatchLoader` yields ``(images float32 (N, C, S, S), targets)``; targets are int64 (N,) for
  single-label and float32 multi-hot (N, K) for multi-label (docs/CONTRACTS.md). Epoch order and
  augmentation are functions of (seed, epoch, step) only, so a resumed run sees the same batches.
* `fingerprint`: sha256 over the sorted (split, relative path, size, label) lines.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from kdviewer.errors import ImageError
from kdviewer.models.manifest import Preprocessing
from kdviewer.models.preprocess import preprocess_frame
from training.config import Augmentation, ConfigError, DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "holdout": "test",
}


@dataclass(frozen=True)
class Sample:
    """One training case: an image file (or a folder of DICOM slices) and its label(s)."""

    path: Path
    target: int | tuple[int, ...]  # class index, or the indices of the positive classes (multi-label)
    patient: str | None = None
    rel: str = ""  # path relative to the data root (fingerprint, reports)
    split: str | None = None  # split named by the source (folder / CSV column), if any


@dataclass
class DataSplits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    class_names: list[str]
    task: str
    policy: str
    fingerprint: str = ""
    skipped: list[str] = field(default_factory=list)  # human-readable notes about dropped rows

    def counts(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "classes": list(self.class_names),
        }


# ------------------------------------------------------------------------------------------ discovery


def _is_image(p: Path, extensions: set[str]) -> bool:
    return p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")


def _series_uid(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID"])
        return str(ds.get("SeriesInstanceUID", "") or "") or None
    except Exception:  # an unreadable file says nothing about the folder
        return None


def _is_series_dir(p: Path) -> bool:
    """A folder of DICOM slices of *one* series (a CT case). A class folder of DICOM radiographs (e.g.
    ``kd-train synth --format dicom``) holds files of many series and is not one: the SeriesInstanceUIDs
    of its first few files (headers only) decide."""
    if not p.is_dir():
        return False
    dicoms = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".dcm", ".dicom"))
    if not dicoms:
        return False
    uids = {_series_uid(f) for f in dicoms[:3]}
    uids.discard(None)
    return len(uids) <= 1


def _cases_in(folder: Path, extensions: set[str]) -> list[Path]:
    """Image files (and DICOM series sub-folders) directly inside ``folder``, sorted."""
    out = []
    for p in sorted(folder.iterdir()):
        if _is_image(p, extensions) or _is_series_dir(p):
            out.append(p)
    return out


def _class_dirs(folder: Path, ignore: Collection[str] = ()) -> list[str]:
    return sorted(
        d.name
        for d in folder.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and d.name.lower() not in ignore
        and not _is_series_dir(d)
    )


def _patient_of(path: Path, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return None
    m = pattern.search(path.name)
    return m.group(1) if m else None


def _from_folders(
    cfg: DataConfig, split_layout: bool
) -> tuple[list[tuple[Path, str, str | None, str | None]], Path]:
    """[(path, label, patient, split)] from root/<split>/<class>/* or root/<class>/*."""
    assert cfg.root is not None
    root = cfg.root
    ext = {e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.extensions}
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    ignore = {d.lower() for d in cfg.ignore_dirs}
    rows: list[tuple[Path, str, str | None, str | None]] = []
    if split_layout:
        for split in SPLITS:
            folder = next(
                (root / a for a, s in _SPLIT_ALIASES.items() if s == split and (root / a).is_dir()), None
            )
            if folder is None:
                continue
            for cls in _class_dirs(folder, ignore):
                rows += [(p, cls, _patient_of(p, pattern), split) for p in _cases_in(folder / cls, ext)]
    else:
        for cls in _class_dirs(root, ignore):
            rows += [(p, cls, _patient_of(p, pattern), None) for p in _cases_in(root / cls, ext)]
    return rows, root


def _from_csv(cfg: DataConfig) -> tuple[list[tuple[Path, str, str | None, str | None]], Path]:
    assert cfg.csv is not None
    base = cfg.root if cfg.root is not None else cfg.csv.parent
    rows: list[tuple[Path, str, str | None, str | None]] = []
    with open(cfg.csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        for col in (cfg.path_column, cfg.label_column):
            if col not in fields:
                raise ConfigError(
                    [
                        {
                            "loc": "data.csv",
                            "msg": f"{cfg.csv} has no column {col!r} (columns: {', '.join(fields)})",
                        }
                    ]
                )
        for row in reader:
            raw_path = (row.get(cfg.path_column) or "").strip()
            if not raw_path:
                continue
            p = Path(raw_path)
            p = p if p.is_absolute() else base / p
            patient = (row.get(cfg.patient_column) or "").strip() or None
            split = _SPLIT_ALIASES.get((row.get(cfg.split_column) or "").strip().lower())
            rows.append((p, (row.get(cfg.label_column) or "").strip(), patient, split))
    return rows, base


def _targets(
    rows: list[tuple[Path, str, str | None, str | None]], cfg: DataConfig, task: str, base: Path
) -> tuple[list[Sample], list[str], list[str]]:
    skipped: list[str] = []
    multi = task == "multi-label"

    negative = set(cfg.negative_labels) | set(cfg.drop_labels)

    def labels_of(text: str) -> list[str]:
        if not multi:
            return [text] if text else []
        return [t.strip() for t in text.split(cfg.label_separator) if t.strip() and t.strip() not in negative]

    if cfg.classes:
        class_names = list(cfg.classes)
    else:
        class_names = sorted({lab for _, text, _, _ in rows for lab in labels_of(text)})
    index = {c: i for i, c in enumerate(class_names)}
    # Folder/CSV labels match the configured classes regardless of case (a recipe's NORMAL, PNEUMONIA
    # and folders normal/, pneumonia/ are the same classes); an exact match wins.
    folded = {c.lower(): c for c in reversed(class_names)}

    def canonical(lab: str) -> str:
        return lab if lab in index else folded.get(lab.lower(), lab)

    samples: list[Sample] = []
    for path, text, patient, split in rows:
        labels = [canonical(lab) for lab in labels_of(text)]
        unknown = [lab for lab in labels if lab not in index]
        if unknown or (not multi and not labels):
            skipped.append(f"{path.name}: label {text!r} not in classes")
            continue
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            rel = path.as_posix()
        target: int | tuple[int, ...] = tuple(sorted(index[x] for x in labels)) if multi else index[labels[0]]
        samples.append(Sample(path, target, patient, rel, split))
    return samples, class_names, skipped


def _stratum(s: Sample) -> Any:
    return s.target


def random_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int, stratify: bool = True
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Shuffle by ``seed`` (per class when ``stratify``) and cut off test then val fractions."""
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[Sample]] = {}
    for s in samples:
        groups.setdefault(_stratum(s) if stratify else 0, []).append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for key in sorted(groups, key=str):
        g = groups[key]
        order = rng.permutation(len(g))
        n_test = round(len(g) * test_fraction)
        n_val = round(len(g) * val_fraction)
        if len(g) >= 2 and val_fraction > 0:
            n_val = max(1, n_val)
        n_val = min(n_val, max(0, len(g) - n_test - 1))
        test += [g[i] for i in order[:n_test]]
        val += [g[i] for i in order[n_test : n_test + n_val]]
        train += [g[i] for i in order[n_test + n_val :]]
    return train, val, test


def patient_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Whole patients go to one split: shuffled patients fill test, then val, by image count."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.patient if s.patient is not None else f"__case__{s.rel}", []).append(s)
    patients = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    total = len(samples)
    want = {"test": test_fraction * total, "val": val_fraction * total}
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for i in order:
        pid = patients[i]
        for split in ("test", "val", "train"):
            if split == "train" or len(out[split]) + len(groups[pid]) / 2 <= want[split]:
                out[split] += groups[pid]
                break
    if val_fraction > 0 and not out["val"] and len(patients) >= 2:  # tiny sets: at least one patient
        pid = next(p for p in (patients[i] for i in order) if groups[p][0] in out["train"])
        out["val"] += groups[pid]
        out["train"] = [s for s in out["train"] if s not in set(groups[pid])]
    return out["train"], out["val"], out["test"]


def stratified_patient_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int, num_classes: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Whole patients per split, each label's positives shared out in proportion to the fractions.

    Iterative stratification (Sechidis et al., ECML 2011) with patients as the units: repeatedly take the
    label with the fewest positive images still unassigned, and give each of its patients (largest
    first, ties in ``seed`` order) to the split that most lacks that label's positives (ties: the split
    that most lacks images). Patients with no positive label then fill the splits by image count. A
    patient with many images of a rare finding is still one unit, so a finding seen in few patients
    cannot be balanced: drop it (``data.drop_labels``).
    """
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.patient if s.patient is not None else f"__case__{s.rel}", []).append(s)
    patients = sorted(groups)
    rng = np.random.default_rng(seed)
    rank = {patients[j]: i for i, j in enumerate(rng.permutation(len(patients)).tolist())}
    counts = {}
    for pid in patients:
        c = np.zeros(num_classes, dtype=np.float64)
        for s in groups[pid]:
            for t in (s.target if isinstance(s.target, tuple) else (s.target,)):
                c[t] += 1
        counts[pid] = c
    names = ("train", "val", "test")
    frac = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    total_labels = sum(counts.values(), np.zeros(num_classes))
    need_labels = frac[:, None] * total_labels[None, :]  # (3, K) positives still wanted per split
    need_images = frac * len(samples)
    out: dict[str, list[Sample]] = {n: [] for n in names}
    left = set(patients)

    def give(pid: str, j: int) -> None:
        out[names[j]] += groups[pid]
        need_labels[j] -= counts[pid]
        need_images[j] -= len(groups[pid])
        left.discard(pid)

    while True:
        remaining = sum((counts[p] for p in left), np.zeros(num_classes))
        open_labels = [k for k in range(num_classes) if remaining[k] > 0]
        if not open_labels:
            break
        k = min(open_labels, key=lambda k: (remaining[k], k))
        for pid in sorted((p for p in left if counts[p][k] > 0), key=lambda p: (-counts[p][k], rank[p])):
            usable = [j for j in range(3) if frac[j] > 0]
            j = max(usable, key=lambda j: (need_labels[j, k], need_images[j], -j))
            give(pid, j)
    for pid in sorted(left, key=lambda p: rank[p]):
        usable = [j for j in range(3) if frac[j] > 0]
        give(pid, max(usable, key=lambda j: (need_images[j], -j)))
    if val_fraction > 0 and not out["val"] and len(patients) >= 2:  # tiny sets: at least one patient
        return patient_split(samples, val_fraction, test_fraction, seed)
    return out["train"], out["val"], out["test"]


def fingerprint(splits: dict[str, list[Sample]]) -> str:
    """sha256 over sorted ``split, relative path, size in bytes, label`` lines."""
    lines = []
    for split, samples in splits.items():
        for s in samples:
            try:
                size = (
                    sum(f.stat().st_size for f in s.path.iterdir())
                    if s.path.is_dir()
                    else s.path.stat().st_size
                )
            except OSError:
                size = -1
            lines.append(f"{split}\t{s.rel}\t{size}\t{s.target}")
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def label_counts(cfg: DataConfig, task: str = "single-label") -> dict[str, int]:
    """Every label the data offers (class folder names or CSV labels) with its image count, before any
    choice of classes: what a form shows so the user can pick and map the classes."""
    if cfg.csv is not None:
        rows, _base = _from_csv(cfg)
    else:
        assert cfg.root is not None
        if not cfg.root.is_dir():
            raise ConfigError([{"loc": "data.root", "msg": f"folder {cfg.root} does not exist"}])
        rows, _base = _from_folders(cfg, (cfg.root / "train").is_dir() and cfg.split in ("auto", "folders"))
    out: dict[str, int] = {}
    for _p, text, _pt, _s in rows:
        labels = [t.strip() for t in text.split(cfg.label_separator)] if task == "multi-label" else [text]
        for lab in labels:
            if lab:
                out[lab] = out.get(lab, 0) + 1
    return dict(sorted(out.items()))


def discover(cfg: DataConfig, task: str = "single-label", seed: int = 0) -> DataSplits:
    """Find the samples, assign them to train/val/test and fingerprint the result."""
    seed = cfg.seed if cfg.seed is not None else seed
    if cfg.csv is not None:
        rows, base = _from_csv(cfg)
        layout = any(r[3] is not None for r in rows)
    else:
        assert cfg.root is not None
        if not cfg.root.is_dir():
            raise ConfigError([{"loc": "data.root", "msg": f"folder {cfg.root} does not exist"}])
        layout = (cfg.root / "train").is_dir() and cfg.split in ("auto", "folders")
        rows, base = _from_folders(cfg, layout)
    if cfg.split == "folders" and not layout:
        raise ConfigError(
            [
                {
                    "loc": "data.split",
                    "msg": "split 'folders' needs root/train, root/val "
                    "(and optionally root/test) folders, or a 'split' column in the CSV",
                }
            ]
        )
    if task == "multi-label" and cfg.csv is None:
        raise ConfigError([{"loc": "task", "msg": "multi-label data needs a CSV (labels joined by '|')"}])
    samples, class_names, skipped = _targets(rows, cfg, task, base)
    if not samples:
        where = cfg.csv if cfg.csv is not None else cfg.root
        found = sorted({text for _p, text, _pt, _s in rows if text})
        msg = f"no labelled images found in {where}"
        if found and cfg.classes:
            msg += (f": the classes asked for ({', '.join(cfg.classes)}) match none of the labels found "
                    f"there ({', '.join(found[:12])}); choose the classes to train on")
        elif not rows:
            msg += " (expected one sub-folder of images per class, or a CSV with path and label columns)"
        raise ConfigError([{"loc": "data", "msg": msg}])
    if task == "single-label" and len(class_names) < 2:
        raise ConfigError([{"loc": "data", "msg": f"need at least two classes, found {class_names}"}])
    policy = cfg.split
    if policy == "auto":
        policy = "folders" if layout else "random"
    if policy == "patient":
        missing = sum(s.patient is None for s in samples)
        if missing == len(samples):
            raise ConfigError(
                [
                    {
                        "loc": "data.split",
                        "msg": "patient-wise split but no patient IDs were found "
                        "(CSV column data.patient_column or data.patient_pattern)",
                    }
                ]
            )
        if missing:
            skipped.append(f"{missing} images without a patient ID are treated as their own patient")
    if policy == "folders":
        train = [s for s in samples if s.split == "train"]
        val = [s for s in samples if s.split == "val"]
        test = [s for s in samples if s.split == "test"]
        if not val:  # e.g. only train/ and test/: carve val out of train
            has_patients = any(s.patient for s in train)
            if has_patients:
                train, val, _ = patient_split(train, cfg.val_fraction, 0.0, seed)
            else:
                train, val, _ = random_split(train, cfg.val_fraction, 0.0, seed, task == "single-label")
    elif policy == "patient" and cfg.stratify_patients:
        train, val, test = stratified_patient_split(
            samples, cfg.val_fraction, cfg.test_fraction, seed, len(class_names)
        )
    elif policy == "patient":
        train, val, test = patient_split(samples, cfg.val_fraction, cfg.test_fraction, seed)
    else:
        train, val, test = random_split(
            samples, cfg.val_fraction, cfg.test_fraction, seed, task == "single-label"
        )
    if cfg.limit is not None:
        rng = np.random.default_rng(seed + 1)
        train, val, test = (
            [part[i] for i in sorted(rng.permutation(len(part))[: cfg.limit])] for part in (train, val, test)
        )
    if not train or not val:
        raise ConfigError(
            [
                {
                    "loc": "data",
                    "msg": f"the split left {len(train)} training and {len(val)} "
                    "validation images; add data or change data.val_fraction",
                }
            ]
        )
    splits = {"train": train, "val": val, "test": test}
    return DataSplits(train, val, test, class_names, task, policy, fingerprint(splits), skipped)


# --------------------------------------------------------------------------------------------- tensors


def load_input(path: Path, pre: Preprocessing) -> np.ndarray:
    """One case -> (C, S, S) float32 model input, exactly as the viewer computes it."""
    from kdviewer.imaging import load

    study = load(path)
    return preprocess_frame(study.frames[study.middle_index()], pre, study)


class ImageDataset(Dataset):
    """Samples + preprocessing; optionally cached as one (N, C, S, S) tensor after the first decode."""

    def __init__(self, samples: list[Sample], pre: Preprocessing, num_classes: int, task: str) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.num_classes = num_classes
        self.task = task
        self.cache: torch.Tensor | None = None
        self.failed: list[str] = []
        self.targets = self._make_targets()

    def _make_targets(self) -> torch.Tensor:
        if self.task == "multi-label":
            t = torch.zeros(len(self.samples), self.num_classes, dtype=torch.float32)
            for i, s in enumerate(self.samples):
                for k in s.target:  # type: ignore[union-attr]
                    t[i, k] = 1.0
            return t
        return torch.tensor([int(s.target) for s in self.samples], dtype=torch.int64)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return (self.pre.channels, self.pre.input_size, self.pre.input_size)

    def nbytes(self, dtype: torch.dtype) -> int:
        c, h, w = self.item_shape
        return len(self) * c * h * w * torch.empty((), dtype=dtype).element_size()

    def load(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index].float()
        return torch.from_numpy(load_input(self.samples[index].path, self.pre))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.load(index), self.targets[index], index

    def build_cache(
        self,
        dtype: torch.dtype = torch.float16,
        workers: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Decode + preprocess every sample once. Unreadable files are dropped (listed in ``failed``)."""
        n = len(self)
        cache = torch.empty((n, *self.item_shape), dtype=dtype)
        ok = np.ones(n, dtype=bool)

        def work(i: int) -> None:
            try:
                cache[i] = torch.from_numpy(load_input(self.samples[i].path, self.pre))
            except ImageError as exc:
                ok[i] = False
                self.failed.append(str(exc))

        threads = workers if workers > 0 else min(4, os.cpu_count() or 1)
        if threads <= 1 or n < 8:
            for i in range(n):
                work(i)
                if progress:
                    progress(i + 1, n)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for done, _ in enumerate(pool.map(work, range(n)), 1):
                    if progress:
                        progress(done, n)
        if not ok.all():
            keep = torch.from_numpy(np.flatnonzero(ok))
            self.samples = [self.samples[i] for i in keep.tolist()]
            self.targets = self.targets[keep]
            cache = cache[keep]
            log.warning("%d unreadable images were left out", int((~ok).sum()))
        self.cache = cache


# ------------------------------------------------------------------------------------------ augmentation


def _fill_value(pre: Preprocessing, channels: int, device: torch.device) -> torch.Tensor:
    mean = torch.tensor(pre.normalization.mean, dtype=torch.float32)
    std = torch.tensor(pre.normalization.std, dtype=torch.float32)
    fill = (0.0 - mean) / std  # what a black pixel becomes after normalisation
    return (
        fill.expand(channels).reshape(1, channels, 1, 1).to(device)
        if fill.numel() == 1
        else (fill.reshape(1, channels, 1, 1).to(device))
    )


def augment_batch(
    x: torch.Tensor, aug: Augmentation, generator: torch.Generator, pre: Preprocessing
) -> torch.Tensor:
    """Random rotation / h-flip / resized crop of each image as one affine warp (bilinear), on x's device.

    Random parameters come from ``generator`` (CPU), so they do not depend on the device. Pixels
    brought in from outside the image are black (normalised 0 intensity), like torchvision's default.
    """
    if not aug.enabled:
        return x
    n = x.shape[0]
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    angle = (u[:, 0] * 2 - 1) * math.radians(aug.rotation)
    flip = torch.where(u[:, 1] < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(n, dtype=torch.float64)
    sx = torch.ones(n, dtype=torch.float64)
    sy = torch.ones(n, dtype=torch.float64)
    tx = torch.zeros(n, dtype=torch.float64)
    ty = torch.zeros(n, dtype=torch.float64)
    if aug.crop_scale is not None:
        lo, hi = aug.crop_scale
        area = lo + (hi - lo) * u[:, 2]
        log_r = (u[:, 3] * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (u[:, 4] * 2 - 1) * (1 - sx)
        ty = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * (1 - sy)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * sx * flip, -sin * sy, tx], 1), torch.stack([sin * sx * flip, cos * sy, ty], 1)], 1
    ).to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = _fill_value(pre, x.shape[1], x.device)
    out = F.grid_sample(x.float() - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + fill).to(x.dtype).contiguous(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------- batching


def _epoch_generator(seed: int, epoch: int, step: int = -1) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + step + 7) % (2**63 - 1))
    return g


class BatchLoader:
    """Batches of ``(images, targets)`` from an `ImageDataset` (cached tensor slicing or DataLoader).

    ``shuffle`` orders each epoch by ``(seed, epoch)`` (a `DistributedSampler`, sharded by rank when
    ``world_size`` > 1). A trailing batch of one image is merged into the previous one (batch norm
    cannot train on a single image). Iterating the loader directly yields ``(x, y)`` pairs for the
    current ``epoch`` (what evaluation / export code expects); the engine uses `iter_batches`.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augmentation | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment if augment is not None and augment.enabled else None
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle and self.world_size == 1:
            return list(range(n))
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=self.shuffle, seed=self.seed
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def batches(self, epoch: int) -> list[list[int]]:
        idx = self.indices(epoch)
        out = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if len(out) >= 2 and len(out[-1]) < 2:
            tail = out.pop()
            out[-1] = out[-1] + tail
        return out

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def iter_batches(
        self, epoch: int, start: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, images, targets)`` on ``device`` from batch number ``start`` of ``epoch``."""
        device = torch.device(device)
        batches = self.batches(epoch)[start:]
        ds = self.dataset
        pin = device.type == "cuda"
        if ds.cache is not None:
            source: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
                (torch.tensor(b), ds.cache[b], ds.targets[b]) for b in batches
            )
        else:
            loader = torch.utils.data.DataLoader(
                ds,
                batch_sampler=batches,
                num_workers=self.num_workers,
                pin_memory=pin,
                persistent_workers=False,
            )
            source = ((i, x, y) for x, y, i in loader)
        for step, (idx, x, y) in enumerate(source, start):
            x = x.to(device, non_blocking=pin).float()
            y = y.to(device, non_blocking=pin)
            if self.augment is not None:
                x = augment_batch(x, self.augment, _epoch_generator(self.seed, epoch, step), ds.pre)
            yield idx, x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, x, y in self.iter_batches(self.epoch):
            yield x, y


def build_datasets(
    splits: DataSplits,
    pre: Preprocessing,
    cfg: DataConfig,
    workers: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, ImageDataset]:
    """One `ImageDataset` per non-empty split, cached in memory when they fit (``data.cache``)."""
    k = len(splits.class_names)
    sets = {name: ImageDataset(getattr(splits, name), pre, k, splits.task) for name in SPLITS}
    sets = {name: ds for name, ds in sets.items() if len(ds)}
    dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    total_mb = sum(ds.nbytes(dtype) for ds in sets.values()) / 2**20
    use = cfg.cache == "on" or (cfg.cache == "auto" and total_mb <= cfg.cache_max_mb)
    if cfg.cache == "auto" and not use:
        log.warning(
            "dataset needs %.0f MB > data.cache_max_mb=%d: decoding every epoch", total_mb, cfg.cache_max_mb
        )
    if use:
        for name, ds in sets.items():
            ds.build_cache(
                dtype, workers, (lambda d, n, _name=name: progress(_name, d, n)) if progress else None
            )
    return sets
