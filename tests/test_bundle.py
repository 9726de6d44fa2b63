"""Bundle reading and validation: schema, missing files, unsafe zips, pickled objects, rebuilding models."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundles import copy_bundle, cxr_bundle

from kdviewer.errors import BundleError
from kdviewer.models.architectures import FeatureExtractor, build_model
from kdviewer.models.bundle import (
    Bundle,
    default_bundle_path,
    open_bundle,
    read_manifest,
    save_manifest,
)

# The first test builds the shared trained bundle (~20 s on an idle machine, minutes on a loaded one).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    return cxr_bundle().path


def _zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, prefix + p.name)
    return out


def test_open_folder_reads_manifest_and_summary(bundle_dir: Path) -> None:
    b = open_bundle(bundle_dir)
    assert isinstance(b, Bundle)
    assert b.manifest.class_names == ["normal", "nodule"]
    assert b.is_synthetic and not b.is_demo
    assert b.has_teacher
    assert b.onnx_path().name == "student.onnx"
    assert b.onnx_path(int8=True).name == "student.int8.onnx"
    text = "\n".join(b.summary())
    assert "resnet18" in text and "OOD guard" in text and "SYNTHETIC" in text
    # a manifest.json path works too
    assert open_bundle(bundle_dir / "manifest.json").manifest.name == b.manifest.name


def test_save_manifest_round_trip(bundle_dir: Path, tmp_path: Path) -> None:
    m = read_manifest(bundle_dir)
    save_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m


def test_unknown_major_is_refused_with_a_clear_message(bundle_dir: Path, tmp_path: Path) -> None:
    d = copy_bundle(bundle_dir, tmp_path / "b", schema_version="2.0")
    with pytest.raises(BundleError) as err:
        open_bundle(d)
    msg = str(err.value)
    assert "schema_version" in msg and "2.0" in msg and "not supported" in msg
    assert "Value error" not in msg  # pydantic noise stripped
    # a newer minor of the known major is fine
    assert open_bundle(copy_bundle(bundle_dir, tmp_path / "c", schema_version="1.7")).manifest


def test_bad_json_and_schema_errors_are_readable(bundle_dir: Path, tmp_path: Path) -> None:
    d = copy_bundle(bundle_dir, tmp_path / "b")
    (d / "manifest.json").write_text('{"name": "x",, }')
    with pytest.raises(BundleError, match=r"not valid JSON \(line 1"):
        open_bundle(d)
    m = json.loads((bundle_dir / "manifest.json").read_text())
    del m["class_names"]
    m["calibration"] = {"temperature": -1}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as err:
        open_bundle(d)
    lines = str(err.value).splitlines()
    assert any(ln.strip().startswith("class_names:") for ln in lines)
    assert any("calibration.temperature" in ln and "> 0" in ln for ln in lines)


def test_missing_manifest_and_missing_named_files(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        open_bundle(tmp_path / "empty")
    d = copy_bundle(bundle_dir, tmp_path / "b")
    (d / "student.onnx").unlink()
    (d / "ood.npz").unlink()
    with pytest.raises(BundleError) as err:
        open_bundle(d)
    msg = str(err.value)
    assert "student.onnx" in msg and "ood.npz" in msg and "missing" in msg


def test_manifest_file_names_cannot_leave_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.onnx").write_bytes(b"x")
    d = copy_bundle(bundle_dir, tmp_path / "b")
    m = json.loads((d / "manifest.json").read_text())
    m["student"]["onnx"] = "../secret.onnx"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leaves the bundle"):
        open_bundle(d)
    b = open_bundle(bundle_dir)
    for bad in ("../secret.onnx", "/etc/passwd", "a/../../x"):
        with pytest.raises(BundleError):
            b.path(bad)
    os.symlink(tmp_path / "secret.onnx", d / "link.onnx")
    m["student"]["onnx"] = "link.onnx"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(d)


def test_zip_bundle_extracted_once_into_the_cache(bundle_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDVIEWER_CACHE", str(tmp_path / "cache"))
    z = _zip_folder(bundle_dir, tmp_path / "b.zip", prefix="cxr/")  # zipped folder (one sub-folder)
    b = open_bundle(z)
    root = b.root
    assert root.is_dir() and (root / "student.onnx").is_file()
    assert b.source == z
    assert (tmp_path / "cache") in root.parents
    b.close()
    stamp = (root / "student.onnx").stat().st_mtime_ns
    b2 = open_bundle(z)  # same content: the same extraction, not a second copy
    assert b2.root == root and (root / "student.onnx").stat().st_mtime_ns == stamp
    assert len([p for p in (tmp_path / "cache" / "bundles").iterdir()]) == 1


def _bad_zip(path: Path, bundle_dir: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    z = _zip_folder(bundle_dir, path)
    with zipfile.ZipFile(z, "a") as zf:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return z


@pytest.mark.parametrize(
    ("member", "mode", "why"),
    [
        ("../evil.txt", None, "leaves the bundle"),
        ("/tmp/evil.txt", None, "absolute path"),
        ("link", stat.S_IFLNK | 0o777, "symbolic link"),
    ],
)
def test_unsafe_zip_members_are_refused(bundle_dir: Path, tmp_path: Path, member: str, mode: int | None,
                                        why: str) -> None:
    z = _bad_zip(tmp_path / "evil.zip", bundle_dir, member, b"/etc/passwd", mode)
    with pytest.raises(BundleError, match=why):
        open_bundle(z)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_zip_member_size_cap(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdviewer.models.bundle as mb

    monkeypatch.setattr(mb, "MAX_MEMBER_BYTES", 1000)
    z = _bad_zip(tmp_path / "big.zip", bundle_dir, "big.bin", b"\0" * 5000)
    with pytest.raises(BundleError, match="too large"):
        open_bundle(z)


class _Evil:
    def __reduce__(self):  # executed by a full unpickler, never by weights_only
        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


def test_pickled_objects_are_refused_not_executed(bundle_dir: Path, tmp_path: Path) -> None:
    d = copy_bundle(bundle_dir, tmp_path / "b")
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    state = torch.load(d / "student.pt", weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, d / "student.pt")
    b = open_bundle(d)
    with pytest.raises(BundleError, match="refused"):
        b.load_state_dict("student.pt")
    with pytest.raises(BundleError):
        b.build_torch("student")
    assert not marker.exists()
    (d / "student.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(BundleError, match="not a readable weights file"):
        b.load_state_dict("student.pt")


def test_build_torch_matches_the_onnx_student(bundle_dir: Path) -> None:
    import onnxruntime as ort

    b = open_bundle(bundle_dir)
    model = b.build_torch("student")
    assert not model.training
    x = cxr_bundle().val_inputs[:4]
    with torch.no_grad():
        logits, feats = FeatureExtractor(model)(torch.from_numpy(x))
    sess = ort.InferenceSession(str(b.onnx_path()), providers=["CPUExecutionProvider"])
    ol, of = sess.run(["logits", "features"], {"input": x})
    assert np.allclose(ol, logits.numpy(), atol=1e-3)
    assert np.allclose(of, feats.numpy(), atol=1e-3)
    teacher = b.build_torch("teacher")
    assert teacher.kd_spec.name == "mobilenet_v3_small"


def test_build_torch_with_dropout_head_and_wrong_shapes(bundle_dir: Path, tmp_path: Path) -> None:
    d = copy_bundle(bundle_dir, tmp_path / "b")
    # a student trained with dropout: head is Sequential(Dropout, Linear) -> keys "fc.1.*"
    torch.save(build_model("resnet18", 2, 1, dropout=0.6).state_dict(), d / "student.pt")
    assert open_bundle(d).build_torch("student").fc[1].out_features == 2
    torch.save(build_model("resnet18", 3, 1).state_dict(), d / "student.pt")
    with pytest.raises(BundleError, match="does not fit a resnet18 with 2 classes"):
        open_bundle(d).build_torch("student")


def test_default_bundle_path_env_and_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDVIEWER_BUNDLE", str(tmp_path))
    assert default_bundle_path() == tmp_path
    monkeypatch.setenv("KDVIEWER_BUNDLE", str(tmp_path / "missing"))
    with pytest.raises(BundleError, match="does not exist"):
        default_bundle_path()
