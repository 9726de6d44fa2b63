"""training.data: discovery, splits (random 70:30, patient-wise without leakage), caching, augmentation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdviewer.models.manifest import Preprocessing
from kdviewer.models.preprocess import preprocess_frame
from training.config import Augmentation, ConfigError, DataConfig
from training.data import (
    BatchLoader,
    ImageDataset,
    augment_batch,
    build_datasets,
    discover,
    load_input,
)

PRE = Preprocessing(input_size=16, resize=16, channels=1)


def _png(path: Path, value: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 20, (size, size + 4)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """root/<class>/*.png (3 classes x 10) + labels.csv with 2 images per patient and a multi-label column."""
    root = tmp_path_factory.mktemp("pool")
    rows = []
    for c, cls in enumerate(["a", "b", "c"]):
        for i in range(10):
            rel = f"{cls}/{cls}{i:02d}.png"
            _png(root / rel, 40 + 60 * c + i)
            multi = "|".join(sorted({cls, "x"} if i % 3 == 0 else {cls}))
            rows.append({"path": rel, "label": cls, "patient_id": f"{cls}-p{i // 2}", "multi": multi})
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_random_split_is_stratified_seeded_and_70_30(pool):
    s1 = discover(DataConfig(root=pool, split="random", val_fraction=0.3), seed=1)
    s2 = discover(DataConfig(root=pool, split="random", val_fraction=0.3), seed=1)
    s3 = discover(DataConfig(root=pool, split="random", val_fraction=0.3), seed=2)
    assert s1.class_names == ["a", "b", "c"] and s1.policy == "random"
    assert (len(s1.train), len(s1.val)) == (21, 9)
    assert [s.rel for s in s1.val] == [s.rel for s in s2.val]
    assert [s.rel for s in s1.val] != [s.rel for s in s3.val]
    assert sorted(s.target for s in s1.val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s1.fingerprint == s2.fingerprint != s3.fingerprint


def test_patient_split_never_shares_a_patient(pool):
    cfg = DataConfig(csv=pool / "labels.csv", split="patient", val_fraction=0.25, test_fraction=0.25)
    for seed in range(5):
        s = discover(cfg, seed=seed)
        ids = [{x.patient for x in part} for part in (s.train, s.val, s.test)]
        assert ids[0] and ids[1] and ids[2]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
        assert len(s.train) + len(s.val) + len(s.test) == 30


def test_patient_split_needs_ids(pool):
    with pytest.raises(ConfigError) as err:
        discover(DataConfig(root=pool, split="patient"))
    assert err.value.errors[0]["loc"] == "data.split"


def test_patient_pattern_from_file_names(pool):
    s = discover(DataConfig(root=pool, split="patient", patient_pattern=r"^([a-c]\d)\d"), seed=0)
    assert not {x.patient for x in s.train} & {x.patient for x in s.val}


def test_folder_layout_and_val_carved_from_train(tmp_path):
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("neg", "pos"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 50 + i + (80 if cls == "pos" else 0))
    s = discover(DataConfig(root=tmp_path, val_fraction=0.34))
    assert s.policy == "folders"
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 4)
    assert {x.rel.split("/")[0] for x in s.test} == {"test"}


def test_multilabel_csv_targets(pool):
    cfg = DataConfig(csv=pool / "labels.csv", label_column="multi", split="random", val_fraction=0.3)
    s = discover(cfg, task="multi-label")
    assert s.class_names == ["a", "b", "c", "x"]
    ds = ImageDataset(s.train, PRE, 4, "multi-label")
    assert ds.targets.dtype == torch.float32 and ds.targets.shape == (len(s.train), 4)
    assert set(ds.targets.sum(1).tolist()) <= {1.0, 2.0}


def test_classes_filter_and_fingerprint_tracks_labels(pool, tmp_path):
    s = discover(DataConfig(csv=pool / "labels.csv", classes=["a", "b"]), seed=0)
    assert s.class_names == ["a", "b"] and len(s.train) + len(s.val) == 20
    assert s.skipped  # the c rows are reported, not silently dropped
    with open(pool / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["label"] = "b"
    with open(tmp_path / "relabelled.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    base = DataConfig(csv=pool / "labels.csv", root=pool)
    other = DataConfig(csv=tmp_path / "relabelled.csv", root=pool)
    assert discover(base).fingerprint != discover(other).fingerprint


def test_cache_matches_the_viewer_preprocessing(pool):
    from kdviewer.imaging import load

    s = discover(DataConfig(root=pool, split="random"), seed=0)
    sets = build_datasets(s, PRE, DataConfig(root=pool, cache="on", cache_dtype="float32"))
    ds = sets["val"]
    assert ds.cache is not None and ds.cache.shape == (len(s.val), 1, 16, 16)
    study = load(s.val[0].path)
    expected = preprocess_frame(study.frames[0], PRE, study)
    assert np.array_equal(ds.cache[0].numpy(), expected)
    assert np.array_equal(load_input(s.val[0].path, PRE), expected)
    half = build_datasets(s, PRE, DataConfig(root=pool, cache="on"))["val"]
    assert half.cache.dtype == torch.float16
    assert torch.allclose(half.cache[0].float(), torch.from_numpy(expected), atol=4e-3)
    off = build_datasets(s, PRE, DataConfig(root=pool, cache="off"))["val"]
    assert off.cache is None and torch.equal(off.load(0), torch.from_numpy(expected))


def test_unreadable_images_are_dropped_with_a_note(pool, tmp_path):
    bad_root = tmp_path / "bad"
    for cls in ("a", "b"):
        for i in range(4):
            _png(bad_root / cls / f"{i}.png", 60 + i)
    (bad_root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s = discover(DataConfig(root=bad_root, split="random", val_fraction=0.25), seed=0)
    sets = build_datasets(s, PRE, DataConfig(root=bad_root, cache="on"))
    total = sum(len(d) for d in sets.values())
    assert total == 8 and sum(len(d.failed) for d in sets.values()) == 1


def test_batches_shard_and_cover_every_index(pool):
    s = discover(DataConfig(root=pool, split="random", val_fraction=0.3), seed=0)
    ds = build_datasets(s, PRE, DataConfig(root=pool))["train"]
    one = BatchLoader(ds, 4, shuffle=True, seed=3)
    flat = [i for b in one.batches(1) for i in b]
    assert sorted(flat) == list(range(len(ds)))
    assert one.batches(1) == BatchLoader(ds, 4, shuffle=True, seed=3).batches(1)
    assert one.batches(1) != one.batches(2)
    assert min(len(b) for b in one.batches(1)) >= 2  # no single-image batch for batch norm
    shards = [BatchLoader(ds, 4, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    a, b = ({i for bt in sh.batches(1) for i in bt} for sh in shards)
    assert a | b == set(range(len(ds)))
    assert len(shards[0].batches(1)) == len(shards[1].batches(1))
    x, y = next(iter(one))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 16, 16)


def test_augment_batch():
    x = torch.randn(4, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert augment_batch(x, Augmentation(), g, PRE) is x
    flipped = augment_batch(x, Augmentation(hflip=True), torch.Generator().manual_seed(0), PRE)
    u = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(4):
        ref = x[i].flip(-1) if u[i, 1] < 0.5 else x[i]
        assert torch.allclose(flipped[i], ref, atol=1e-5)
    rot = augment_batch(x, Augmentation(rotation=15, crop_scale=(0.7, 1.0)), g, PRE)
    assert rot.shape == x.shape and torch.isfinite(rot).all() and not torch.allclose(rot, x)
    aug = Augmentation(rotation=15, crop_scale=(0.7, 1.0))
    again = augment_batch(x, aug, torch.Generator().manual_seed(0), PRE)
    assert torch.equal(rot, again)


def test_synthetic_ct_dicom_series_with_a_lung_window(tmp_path):
    from training.synth import generate

    root = generate("ct", 6, tmp_path / "ct", fmt="dicom", size=32, series_slices=3, seed=0)
    s = discover(DataConfig(root=root, split="random", val_fraction=0.34), seed=0)
    assert s.class_names == ["mild", "severe"]  # the masks/ folder is not a class
    assert all(x.path.is_dir() for x in s.train)  # one case = one folder of slices
    pre = Preprocessing(input_size=16, resize=16, intensity="window", window_center=-600, window_width=1500)
    ds = build_datasets(s, pre, DataConfig(root=root, cache="on", cache_dtype="float32"))["train"]
    x = ds.cache[0, 0]
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # normalised range of the window
    assert float(x.min()) >= lo - 1e-5 and float(x.max()) <= hi + 1e-5 and float(x.std()) > 0.1
    by_patient = discover(DataConfig(csv=root / "labels.csv", split="patient"), seed=0)
    assert {x.rel for x in by_patient.train + by_patient.val} == {x.rel for x in s.train + s.val}
    assert not {x.patient for x in by_patient.train} & {x.patient for x in by_patient.val}
