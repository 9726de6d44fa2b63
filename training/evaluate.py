"""Evaluate models on a split: torch models (engine, export) and bundles (``kd-train eval``).

* `evaluate_model` runs a torch classifier over a loader of ``(images, targets)`` batches and returns
  logits, probabilities (softmax / per-label sigmoid, optionally temperature-scaled), targets and,
  on request, the penultimate features (captured with a temporary hook on the classifier head).
* `evaluate_bundle` runs a bundle's ONNX student (fp32 or INT8, through ONNX Runtime — what the
  viewer deploys) or its torch teacher on any labelled image dataset, preprocessed exactly as the
  manifest says, and computes the metrics table with bootstrap CIs.
* ``kd-train eval BUNDLE DATA [--int8] [--teacher] [--json]`` prints that table.

Datasets accepted by ``kd-train eval`` (`load_labelled_images`):

* an image folder ``DATA/<class>/*`` (class folder names = the bundle's class names; a sub-folder
  of image files inside a class folder is one case: a DICOM series, read as a volume),
* a split folder ``DATA/{train,val,test}/<class>/*`` (``--split``; default test, else val),
* a CSV file with a ``path`` column (relative to the CSV) and either a ``label`` column (class
  name; multi-label: names joined by ``|``) or one 0/1 column per class name; an optional
  ``split`` column is honoured by ``--split``. Rows whose label is not one of the bundle's classes
  are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------ torch models


def _head_module(model: Any) -> Any:
    from kdviewer.models.architectures import get_module, spec_of

    return get_module(model, spec_of(model).head)


def evaluate_model(
    model: Any,
    loader: Iterable,
    class_names: Sequence[str],
    task: str = "single-label",
    device: str = "cpu",
    *,
    features: bool = False,
    temperature: float = 1.0,
    max_items: int | None = None,
    keep_fraction: float = 1.0,
    seed: int = 0,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` (eval mode, no grad) over ``loader``.

    Returns {"logits" (N, K), "probs" (N, K), "targets" ((N,) int64 or (N, K) float32)} plus
    "features" (N, D) when ``features`` is set. ``probs`` use ``temperature``. ``keep_fraction`` < 1
    evaluates a seeded random subset of the *batches* (an unbiased sample of a large, possibly
    class-ordered loader at a fraction of the cost); ``max_items`` stops after that many items.
    ``channels_last`` runs it in that memory format (faster convolutions on CPUs; the model is given
    back in the default format). The model's training flag is restored afterwards.
    """
    import torch

    from training.placement import Placement

    # the model and every batch on one device, fp32
    place = Placement(torch.device(device), channels_last=channels_last)
    model = place.model(model)
    grabbed: list[torch.Tensor] = []
    handle = None
    if features:

        def grab(_m: Any, args: tuple) -> None:
            grabbed.append(torch.flatten(args[0], 1).detach().float().cpu())

        handle = _head_module(model).register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()

    def forward(x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        out = model(place.inputs(x)).detach().float().cpu().numpy()
        return out, (grabbed.pop().numpy() if features else None)

    try:
        with torch.inference_mode():
            return _predict(forward, loader, class_names, task, temperature, max_items, keep_fraction, seed)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
        if channels_last:
            Placement(torch.device(device)).model(model)


def evaluate_onnx(
    session: Any,
    loader: Iterable,
    class_names: Sequence[str],
    task: str = "single-label",
    *,
    features: bool = False,
    temperature: float = 1.0,
    max_items: int | None = None,
    keep_fraction: float = 1.0,
    seed: int = 0,
    sample: int = 0,
) -> dict[str, np.ndarray]:
    """`evaluate_model` for an exported student (`kdviewer.models.onnx_export`: outputs "logits" and
    "features") in an ONNX Runtime ``session``: the file the viewer deploys, at ORT's speed.

    ``sample`` > 0 also keeps a uniform random sample of that many of the evaluated input images:
    "sample_images" (M, C, S, S) float32 and their row numbers "sample_index" (the export's INT8
    calibration and parity sets, taken in the same pass)."""
    name = session.get_inputs()[0].name
    outputs = ["logits", "features"] if features else ["logits"]

    def forward(x: Any) -> tuple[np.ndarray, np.ndarray | None]:
        arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        res = session.run(outputs, {name: np.ascontiguousarray(arr, dtype=np.float32)})
        return res[0], (res[1] if features else None)

    return _predict(forward, loader, class_names, task, temperature, max_items, keep_fraction, seed, sample)


def _predict(
    forward: Any,
    loader: Iterable,
    class_names: Sequence[str],
    task: str,
    temperature: float,
    max_items: int | None,
    keep_fraction: float,
    seed: int,
    sample: int = 0,
) -> dict[str, np.ndarray]:
    """The loop of `evaluate_model` / `evaluate_onnx`: ``forward(images) -> (logits, features | None)``."""
    from training.calibration import probabilities
    from training.quantize import Reservoir

    logits_l: list[np.ndarray] = []
    feats_l: list[np.ndarray] = []
    targets_l: list[np.ndarray] = []
    reservoir = Reservoir(sample, seed) if sample > 0 else None
    seen = 0
    rng = np.random.default_rng(seed)
    for batch in loader:
        if keep_fraction < 1.0 and rng.random() >= keep_fraction:
            continue
        x, y = batch[0], batch[1]
        lo, fe = forward(x)
        logits_l.append(np.asarray(lo, dtype=np.float32))
        if fe is not None:
            feats_l.append(np.asarray(fe, dtype=np.float32).reshape(len(lo), -1))
        targets_l.append(y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y))
        if reservoir is not None:
            reservoir.add(x)
        seen += len(lo)
        if max_items is not None and seen >= max_items:
            break
    if not logits_l:
        raise ValueError("the evaluation loader yielded no batches")
    logits = np.concatenate(logits_l)
    targets = np.concatenate(targets_l)
    targets = targets.astype(np.float32) if task == "multi-label" else targets.astype(np.int64).reshape(-1)
    if logits.shape[1] != len(class_names):
        raise ValueError(f"model returns {logits.shape[1]} logits but there are {len(class_names)} classes")
    n = len(logits) if max_items is None else min(len(logits), max_items)
    out: dict[str, np.ndarray] = {
        "logits": logits[:n],
        "probs": probabilities(logits[:n], task, temperature).astype(np.float32),
        "targets": targets[:n],
    }
    if feats_l:
        out["features"] = np.concatenate(feats_l)[:n]
    if reservoir is not None:
        index, images = reservoir.result(limit=n)
        out["sample_index"], out["sample_images"] = index, images
    return out


# ----------------------------------------------------------------------------------------- datasets


@dataclass
class LabelledImages:
    """Preprocessed images of a labelled dataset (what `load_labelled_images` returns)."""

    images: np.ndarray  # (N, C, S, S) float32
    targets: np.ndarray  # (N,) int64 or (N, K) float32
    paths: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # unknown label -> count
    failed: list[str] = field(default_factory=list)  # unreadable files


def _is_series_dir(p: Path) -> bool:
    """A sub-folder holding image files directly: one case (a DICOM series, loaded as a volume)."""
    from kdviewer.imaging import is_supported_file

    return p.is_dir() and any(is_supported_file(f) for f in p.iterdir())


#: Sub-folders that hold annotations of the images (e.g. the synthetic datasets' lesion ``masks/``), not a
#: class: never listed as "labels not in the bundle" (unless the bundle has a class of that name).
ANNOTATION_FOLDERS = frozenset({"masks", "mask", "annotations", "segmentations", "labels", "rois", "bboxes"})


def _list_folder(root: Path, class_names: list[str]) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    from kdviewer.imaging import is_supported_file

    by_lower = {c.lower(): c for c in class_names}
    items, skipped = [], {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        cls = by_lower.get(sub.name.lower())
        if cls is None and sub.name.lower() in ANNOTATION_FOLDERS:
            continue
        files = [p for p in sorted(sub.iterdir()) if is_supported_file(p) or _is_series_dir(p)]
        if cls is None:
            skipped[sub.name] = len(files)
            continue
        items += [(p, cls) for p in files]
    return items, skipped


def _list_csv(
    csv_path: Path, class_names: list[str], task: str, split: str | None
) -> tuple[list[tuple[Path, Any]], dict[str, int]]:
    by_lower = {c.lower(): c for c in class_names}
    items: list[tuple[Path, Any]] = []
    skipped: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        lower_cols = {c.lower(): c for c in cols}
        path_col = next(
            (lower_cols[k] for k in ("path", "file", "filename", "image") if k in lower_cols), None
        )
        if path_col is None:
            raise ValueError(f"{csv_path}: needs a 'path' column (found: {', '.join(cols)})")
        label_col = lower_cols.get("label") or lower_cols.get("labels")
        class_cols = [lower_cols.get(c.lower()) for c in class_names]
        if label_col is None and not all(class_cols):
            raise ValueError(f"{csv_path}: needs a 'label' column or one 0/1 column per class {class_names}")
        split_col = lower_cols.get("split")
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if split and split_col and row.get(split_col, "").lower() != split:
                continue
            p = Path(row[path_col])
            p = p if p.is_absolute() else csv_path.parent / p
            if label_col is not None:
                names = [s.strip() for s in row[label_col].replace(";", "|").split("|") if s.strip()]
                known = [by_lower.get(n.lower()) for n in names]
                if task == "multi-label":
                    if any(k is None for k in known):
                        bad = next(n for n, k in zip(names, known, strict=False) if k is None)
                        skipped[bad] = skipped.get(bad, 0) + 1
                        continue
                    items.append((p, [k for k in known if k]))
                else:
                    if len(names) != 1 or known[0] is None:
                        key = row[label_col] or "(empty)"
                        skipped[key] = skipped.get(key, 0) + 1
                        continue
                    items.append((p, known[0]))
            else:
                flags = [float(row[c] or 0) > 0.5 for c in class_cols]  # type: ignore[index]
                if task == "multi-label":
                    items.append((p, [c for c, f in zip(class_names, flags, strict=False) if f]))
                elif sum(flags) == 1:
                    items.append((p, class_names[flags.index(True)]))
                else:
                    skipped["(not exactly one class)"] = skipped.get("(not exactly one class)", 0) + 1
    return items, skipped


def list_labelled_files(
    data: str | Path, class_names: Sequence[str], task: str = "single-label", split: str | None = None
) -> tuple[list[tuple[Path, Any]], dict[str, int]]:
    """(file, label) pairs of an image folder / split folder / CSV (see the module docstring)."""
    data = Path(data)
    names = [str(c) for c in class_names]
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise ValueError(f"{data}: expected a folder or a .csv file")
        return _list_csv(data, names, task, split)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: dataset not found")
    if task == "multi-label":
        csvs = sorted(data.glob("*.csv"))
        if csvs:
            return _list_csv(csvs[0], names, task, split)
        raise ValueError(f"{data}: a multi-label dataset must be a CSV (path,label with '|' separated names)")
    present = [s for s in SPLITS if (data / s).is_dir()]
    if present:
        chosen = split or ("test" if "test" in present else "val" if "val" in present else present[0])
        if chosen not in present:
            raise ValueError(f"{data}: no '{chosen}' split folder (found: {', '.join(present)})")
        return _list_folder(data / chosen, names)
    if split is None and (data / "labels.csv").is_file() and not any((data / c).is_dir() for c in names):
        return _list_csv(data / "labels.csv", names, task, None)
    return _list_folder(data, names)


def load_labelled_images(
    data: str | Path,
    preprocessing: Any,
    class_names: Sequence[str],
    task: str = "single-label",
    split: str | None = None,
    limit: int | None = None,
) -> LabelledImages:
    """Read and preprocess every labelled image of a dataset with a manifest's ``Preprocessing``."""
    from kdviewer.errors import ImageError
    from kdviewer.imaging import load
    from kdviewer.models.preprocess import preprocess_study

    items, skipped = list_labelled_files(data, class_names, task, split)
    if limit is not None:
        items = items[:limit]
    names = list(class_names)
    images, targets, paths, failed = [], [], [], []
    for path, label in items:
        try:
            study = load(path)
            x = preprocess_study(study, preprocessing)[0]
        except (ImageError, OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            failed.append(str(path))
            continue
        images.append(x)
        if task == "multi-label":
            t = np.zeros(len(names), np.float32)
            t[[names.index(c) for c in label]] = 1.0
            targets.append(t)
        else:
            targets.append(names.index(label))
        paths.append(str(path))
    if not images:
        raise ValueError(
            f"{data}: no labelled images of the classes {names} were found"
            + (f" (skipped labels: {skipped})" if skipped else "")
        )
    tarr = np.stack(targets).astype(np.float32) if task == "multi-label" else np.asarray(targets, np.int64)
    return LabelledImages(np.stack(images).astype(np.float32), tarr, paths, skipped, failed)


def _array_loader(images: np.ndarray, targets: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.from_numpy(images), torch.from_numpy(targets))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def dataset_loaders(data: str | Path, manifest: Any, batch_size: int = 32) -> dict[str, Any]:
    """Loaders {"train", "val", "test"?} for fine-tuning / re-exporting a bundle's model on ``data``.

    Uses the engine's discovery (`training.data.discover`) with the data settings recorded in the
    bundle's training config (split policy, fractions, seed, CSV columns) and ``data`` as the root /
    CSV, so a pruned model is fine-tuned and evaluated on the same split as the original; falls back
    to ``data/{train,val[,test]}`` folders when the engine's data module cannot be used.
    """
    pre, names, task = manifest.preprocessing, list(manifest.class_names), manifest.task
    try:
        return _engine_loaders(data, manifest, batch_size)
    except ImportError as exc:
        log.info("engine data module unavailable (%s); reading split folders directly", exc)
    out = {}
    for split in SPLITS:
        try:
            ds = load_labelled_images(data, pre, names, task, split)
        except ValueError:
            if split == "test":
                continue
            raise
        out[split] = _array_loader(ds.images, ds.targets, batch_size, shuffle=split == "train")
    return out


def _engine_loaders(data: str | Path, manifest: Any, batch_size: int) -> dict[str, Any]:
    import torch

    from training.config import DataConfig
    from training.data import build_datasets, discover

    config = manifest.training.get("config") if isinstance(manifest.training, dict) else None
    recorded = dict(config.get("data") or {}) if isinstance(config, dict) else {}
    seed = (config.get("runtime") or {}).get("seed", 0) if isinstance(config, dict) else 0
    data = Path(data)
    keep = {k: v for k, v in recorded.items() if k not in ("root", "csv", "generate", "limit", "classes")}
    if data.is_file():
        keep.update(csv=data, root=None)
    else:
        keep.update(root=data, csv=None)
    keep["classes"] = list(manifest.class_names)
    cfg = DataConfig.model_validate(keep)
    splits = discover(cfg, manifest.task, seed if isinstance(seed, int) else 0)
    if list(splits.class_names) != list(manifest.class_names):
        raise ValueError(
            f"{data}: classes {splits.class_names} differ from the bundle's {manifest.class_names}"
        )
    sets = build_datasets(splits, manifest.preprocessing, cfg)
    out = {}
    for split, ds in sets.items():
        images = torch.stack([ds.load(i) for i in range(len(ds))]).float().numpy()
        out[split] = _array_loader(images, ds.targets.numpy(), batch_size, shuffle=split == "train")
    if "train" not in out or "val" not in out:
        raise ValueError(f"{data}: needs both a training and a validation split (found {sorted(out)})")
    return out


# ---------------------------------------------------------------------------------------- bundles


def evaluate_bundle(
    bundle: str | Path,
    data: str | Path,
    *,
    int8: bool = False,
    teacher: bool = False,
    split: str | None = None,
    n_boot: int = 1000,
    threads: int = 2,
    limit: int | None = None,
) -> dict[str, Any]:
    """Metrics (with CIs) of a bundle's deployed student (or its teacher) on a labelled dataset.

    Probabilities include the manifest's calibration temperature, as in the viewer. Returns the
    `training.metrics.compute_metrics` dict plus "model", "dataset", "skipped", "failed".
    """
    from kdviewer.models.bundle import open_bundle
    from kdviewer.models.onnx_export import ort_session
    from training.calibration import probabilities
    from training.metrics import compute_metrics
    from training.quantize import run_onnx

    with open_bundle(bundle) as b:
        m = b.manifest
        ds = load_labelled_images(data, m.preprocessing, m.class_names, m.task, split, limit)
        t = float(m.calibration.temperature)
        if teacher:
            model = b.build_torch("teacher")
            loader = _array_loader(ds.images, ds.targets, 64, shuffle=False)
            logits = evaluate_model(model, loader, m.class_names, m.task)["logits"]
            what = f"teacher {m.teacher.architecture} (torch fp32)"  # type: ignore[union-attr]
        else:
            path = b.onnx_path(int8=int8)
            if path is None:
                raise ValueError(f"{bundle}: this bundle has no {'INT8 ' if int8 else ''}ONNX student")
            logits = run_onnx(ort_session(path, threads), ds.images)[0]
            what = f"student {m.student.architecture} (ONNX Runtime {'INT8' if int8 else 'fp32'})"
        probs = probabilities(logits, m.task, t if not teacher else 1.0)
        result = compute_metrics(ds.targets, probs, m.class_names, m.task, m.positive_class, n_boot=n_boot)
    result.update(model=what, dataset=str(data), skipped=ds.skipped, failed=ds.failed, bundle=str(bundle))
    return result


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``kd-train eval BUNDLE DATA [--int8] [--teacher] [--json]``."""
    p = subparsers.add_parser(
        "eval",
        help="metrics table (value, 95%% CI) of a bundle on an image-folder or CSV dataset",
        description="Evaluate a model bundle on a labelled dataset (image folder, split folder or CSV).",
    )
    p.add_argument("bundle", help="model bundle folder or .zip")
    p.add_argument("data", help="image folder (DATA/<class>/*), split folder (DATA/test/<class>/*) or CSV")
    p.add_argument("--int8", action="store_true", help="evaluate the INT8 ONNX student")
    p.add_argument("--teacher", action="store_true", help="evaluate the teacher (torch) instead")
    p.add_argument("--split", choices=SPLITS, default=None, help="which split of a split folder / CSV")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    from training.metrics import format_table

    result = evaluate_bundle(
        args.bundle,
        args.data,
        int8=args.int8,
        teacher=args.teacher,
        split=args.split,
        n_boot=args.n_boot,
        threads=args.threads,
        limit=args.limit,
    )
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=float)
        sys.stdout.write("\n")
        return 0
    print(format_table(result, title=f"{result['model']} on {result['dataset']}"))
    if result.get("task") == "single-label":
        names = result["class_names"]
        print("confusion matrix (rows = truth, columns = prediction):")
        width = max(len(n) for n in names)
        print(" " * (width + 2) + "  ".join(n.rjust(width) for n in names))
        for n, row in zip(names, result["confusion_matrix"], strict=False):
            print(n.rjust(width) + "  " + "  ".join(str(v).rjust(width) for v in row))
    if result["skipped"]:
        print(
            "skipped (labels not in the bundle): "
            + ", ".join(f"{k}: {v}" for k, v in result["skipped"].items())
        )
    if result["failed"]:
        print(f"unreadable files skipped: {len(result['failed'])}")
    return 0
