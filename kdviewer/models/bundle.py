"""Open, validate and read model bundles (a folder or a .zip holding ``manifest.json`` + weights).

Safety rules (a bundle may come from anywhere):

* a .zip is extracted to a private temporary folder only after every member name has been checked:
  absolute paths, drive letters, ``..`` components, symlinks and members larger than a size cap are
  refused; the extraction itself counts bytes so a lying header cannot inflate past the cap;
* every file a bundle names is resolved with `Bundle.path`, which refuses anything outside the root;
* state dicts are read with ``torch.load(weights_only=True)``: a file that would need to unpickle
  arbitrary objects is refused as a `BundleError`, never executed.

Every problem is a `BundleError` whose message lists human-readable lines (what is wrong, where).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import weakref
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pydantic import ValidationError

from kdviewer.errors import BundleError
from kdviewer.models.manifest import Manifest, ModelSpec

if TYPE_CHECKING:  # torch is imported lazily: `kdviewer info` on a bundle should not pay for it
    import torch
    from torch import nn

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: Largest single member accepted from a zip (a ResNet50 state dict is ~100 MB).
MAX_MEMBER_BYTES = 2 * 1024**3
#: Largest total extracted size of a zip.
MAX_TOTAL_BYTES = 4 * 1024**3
#: A member larger than this that expands more than `MAX_RATIO`-fold is a zip bomb (weights and ONNX
#: files compress less than 2-fold).
BOMB_MIN_BYTES = 16 * 1024**2
MAX_RATIO = 50
#: Size cap of the per-user cache of extracted .zip bundles (least recently used ones go first).
MAX_CACHE_BYTES = 4 * 1024**3
#: Largest manifest.json (a real one is a few kB; the training history can make it a few hundred).
MAX_MANIFEST_BYTES = 4 * 1024**2
#: The default model: trained on real paediatric chest radiographs (resources/models/kermany_cxr).
DEFAULT_BUNDLE = ("models", "kermany_cxr")
#: The synthetic demo bundle (resources/demo/cxr_demo): tests and phantoms only, labelled DEMO.
DEMO_BUNDLE = ("demo", "cxr_demo")

Role = Literal["student", "teacher"]


# --------------------------------------------------------------------------------------------- zip


def _check_member(info: zipfile.ZipInfo) -> str | None:
    """Why this zip member is unsafe, or None when it is fine."""
    name = info.filename
    if "\x00" in name:
        return "name contains a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "absolute path"
    if any(part == ".." for part in PurePosixPath(norm).parts):
        return "path leaves the bundle ('..')"
    mode = (info.external_attr >> 16) & 0xFFFF
    if mode and stat.S_ISLNK(mode):
        return "symbolic link"
    # Python's zipfile.writestr stores permission bits without a file type (S_IFMT == 0): a regular file
    if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"too large ({info.file_size / 1e6:.0f} MB > {MAX_MEMBER_BYTES / 1e6:.0f} MB)"
    if info.file_size > BOMB_MIN_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
        return (f"expands {info.file_size / max(1, info.compress_size):.0f}-fold to "
                f"{info.file_size / 1e6:.0f} MB (weights compress less than {MAX_RATIO}-fold: a zip bomb)")
    return None


def _safe_extract(zip_path: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{zip_path}: not a readable .zip bundle ({exc})") from exc
    with zf:
        infos = zf.infolist()
        problems = [f"  {i.filename!r}: {why}" for i in infos if (why := _check_member(i))]
        if problems:
            raise BundleError(
                f"{zip_path}: refused an unsafe bundle archive:\n" + "\n".join(problems[:20])
            )
        total = 0
        dest_resolved = dest.resolve()
        for info in infos:
            rel = info.filename.replace("\\", "/")
            target = (dest / rel).resolve()
            if target != dest_resolved and dest_resolved not in target.parents:
                raise BundleError(f"{zip_path}: member {info.filename!r} would be written outside the bundle")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        total += len(chunk)
                        if written > MAX_MEMBER_BYTES or total > MAX_TOTAL_BYTES:
                            raise BundleError(
                                f"{zip_path}: member {info.filename!r} expands beyond the size cap "
                                "(possible zip bomb); refused"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
                raise BundleError(f"{zip_path}: member {info.filename!r} is damaged ({exc})") from exc


def cache_dir() -> Path:
    """Where extracted .zip bundles are kept: $KDVIEWER_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/kdviewer."""
    env = os.environ.get("KDVIEWER_CACHE")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base if env else base / "kdviewer") / "bundles"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def clean_cache(keep: Path | None = None, max_bytes: int | None = None) -> None:
    """Remove extractions left by killed runs (their process is gone) and, above the size cap, the
    least recently used bundles (never ``keep``)."""
    root = cache_dir()
    if not root.is_dir():
        return
    cap = MAX_CACHE_BYTES if max_bytes is None else max_bytes
    entries: list[tuple[float, int, Path]] = []
    for entry in root.iterdir():
        if entry.name.startswith(".tmp-"):
            try:
                pid = int(entry.name.split("-")[-2])
            except (ValueError, IndexError):
                pid = -1
            if pid < 0 or not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if entry.is_dir() and entry != keep:
            try:
                used = entry.stat().st_mtime
            except OSError:
                continue
            entries.append((used, _tree_bytes(entry), entry))
    total = sum(n for _, n, _ in entries) + (_tree_bytes(keep) if keep is not None and keep.exists() else 0)
    for _, n, entry in sorted(entries):
        if total <= cap:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= n


def _content_key(zip_path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(zip_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:32]


def _extract_cached(zip_path: Path) -> Path:
    """The folder holding ``zip_path``'s contents: extracted once per content hash into the per-user
    cache (atomically: a killed extraction leaves only a ``.tmp-`` folder that the next open removes)."""
    try:
        key = _content_key(zip_path)
    except OSError as exc:
        raise BundleError(f"{zip_path}: cannot read the bundle ({exc.strerror or exc})") from exc
    root = cache_dir()
    final = root / key
    if (final / ".complete").is_file():
        os.utime(final)  # most recently used
        return final
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
    except OSError as exc:
        raise BundleError(f"cannot create the bundle cache {root} ({exc.strerror or exc})") from exc
    try:
        _safe_extract(zip_path, tmp)
        (tmp / ".complete").write_text(str(zip_path), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same bundle first
            if not (final / ".complete").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_cache(keep=final)
    return final


def _find_root(folder: Path) -> Path:
    """The folder holding manifest.json: ``folder`` itself or its single sub-folder (zipped folder)."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("__MACOSX")]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_NAME).is_file():
        return subdirs[0]
    return folder


# ---------------------------------------------------------------------------------------- manifest


def _validation_lines(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(manifest)"
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return lines


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate a ``manifest.json`` file (or a folder containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path.parent}: not a model bundle (no {MANIFEST_NAME})")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: manifest is {size / 1e6:.1f} MB, above the "
                          f"{MAX_MANIFEST_BYTES / 1e6:.0f} MB a manifest can need; refused")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as exc:
        raise BundleError(f"{path}: manifest is nested too deeply to be a bundle manifest; refused") from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: manifest is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: manifest is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except RecursionError as exc:
        raise BundleError(f"{path}: manifest is nested too deeply to be a bundle manifest; refused") from exc
    except ValidationError as exc:
        lines = _validation_lines(exc)
        raise BundleError(f"{path}: invalid bundle manifest:\n" + "\n".join(lines)) from exc


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``directory`` (created if needed); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / MANIFEST_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def _named_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(what, relative name) of every file the manifest refers to."""
    out: list[tuple[str, str]] = []
    specs: list[tuple[str, ModelSpec | None]] = [("student", manifest.student), ("teacher", manifest.teacher)]
    for role, spec in specs:
        if spec is None:
            continue
        for attr in ("weights", "onnx", "onnx_int8"):
            name = getattr(spec, attr)
            if name:
                out.append((f"{role}.{attr}", name))
    if manifest.ood is not None and manifest.ood.method == "mahalanobis" and manifest.ood.stats:
        out.append(("ood.stats", manifest.ood.stats))
    return out


# ------------------------------------------------------------------------------------------ bundle


@dataclass
class Bundle:
    """An opened, validated bundle. Files are read through `path` (never outside ``root``)."""

    root: Path
    manifest: Manifest
    source: Path
    _tmp: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._tmp is not None:
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmp, True)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def is_demo(self) -> bool:
        return bool(self.manifest.demo)

    @property
    def is_synthetic(self) -> bool:
        return bool(self.manifest.synthetic_data)

    @property
    def has_teacher(self) -> bool:
        t = self.manifest.teacher
        return t is not None and bool(t.weights)

    def close(self) -> None:
        """Remove the temporary extraction folder of a zipped bundle (no-op for folders)."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Resolve a file name from the manifest inside the bundle; BundleError if it escapes/misses."""
        norm = str(name).replace("\\", "/")
        if not norm or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
            raise BundleError(f"{self.source}: file name {name!r} in the manifest is not a relative path")
        if any(part == ".." for part in PurePosixPath(norm).parts):
            raise BundleError(f"{self.source}: file name {name!r} in the manifest leaves the bundle")
        root = self.root.resolve()
        p = (root / norm).resolve()
        if root not in p.parents:
            raise BundleError(f"{self.source}: file name {name!r} resolves outside the bundle")
        if not p.is_file():
            raise BundleError(f"{self.source}: file {name!r} named in the manifest is missing")
        return p

    def has_file(self, name: str | None) -> bool:
        if not name:
            return False
        try:
            self.path(name)
        except BundleError:
            return False
        return True

    def spec(self, role: Role = "student") -> ModelSpec:
        if role == "student":
            return self.manifest.student
        if role == "teacher":
            if self.manifest.teacher is None:
                raise BundleError(f"{self.source}: this bundle has no teacher model")
            return self.manifest.teacher
        raise ValueError(f"role must be 'student' or 'teacher', not {role!r}")

    def onnx_path(self, int8: bool = False) -> Path | None:
        """The student's ONNX file (INT8 variant when ``int8``), or None when the bundle has none."""
        spec = self.manifest.student
        name = spec.onnx_int8 if int8 else spec.onnx
        return self.path(name) if name else None

    def load_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Read a state dict safely (``weights_only=True``); anything needing pickled objects is refused."""
        import pickle

        import torch

        p = self.path(name)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            if detail:
                raise BundleError(
                    f"{self.source}: {name} contains Python objects other than tensors and was refused "
                    f"(weights files must be plain state dicts; {detail.rstrip('.')})"
                ) from exc
            raise BundleError(f"{self.source}: {name} is not a readable weights file (damaged or not "
                              "written by torch.save)") from exc
        except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(f"{self.source}: {name} is not a readable weights file ({first})") from exc
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise BundleError(f"{self.source}: {name} is not a state dict (name -> tensor)")
        return dict(obj)

    def build_torch(self, role: Role = "student") -> nn.Module:
        """Rebuild the ``role`` network from its state dict, in eval mode on the CPU."""
        from kdviewer.models.architectures import SPECS, build_model

        _import_custom_architectures()
        spec = self.spec(role)
        if not spec.weights:
            raise BundleError(f"{self.source}: the {role} has no weights file (needed for torch / saliency)")
        state = self.load_state_dict(spec.weights)
        arch = spec.architecture
        if arch not in SPECS:
            raise BundleError(
                f"{self.source}: the {role} architecture {arch!r} is unknown to this kdviewer "
                f"(known: {', '.join(sorted(SPECS))})"
            )
        head = SPECS[arch].head
        # build_model(dropout > 0) wraps the head as Sequential(Dropout, Linear): keys "<head>.1.*".
        # Dropout does nothing in eval, so any positive rate rebuilds the same structure.
        dropout = float(self.manifest.training.get(f"{role}_dropout", 0.0) or 0.0)
        wrapped = f"{head}.1.weight" in state
        if wrapped and dropout <= 0:
            dropout = 0.5
        elif not wrapped:
            dropout = 0.0
        pre = self.manifest.preprocessing
        try:
            model = build_model(arch, self.manifest.num_classes, pre.channels, dropout)
            pruned = self.manifest.training.get("pruned_channels") if role == "student" else None
            if pruned:  # a structurally pruned student: reshape before loading its smaller weights
                from kdviewer.models.pruning import apply_channel_config

                apply_channel_config(model, {str(k): int(v) for k, v in dict(pruned).items()})
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            lines = str(exc).splitlines()
            raise BundleError(
                f"{self.source}: {spec.weights} does not fit a {arch} with {self.manifest.num_classes} "
                f"classes and {pre.channels} input channel(s): " + " ".join(x.strip() for x in lines[:3])
            ) from exc
        model.eval()
        return model

    def summary(self) -> list[str]:
        """Human-readable lines describing the bundle (for `kdviewer info`)."""
        m = self.manifest
        pre = m.preprocessing
        lines = [
            f"bundle: {m.name}  (schema {m.schema_version})  at {self.source}",
            f"task: {m.task}; classes: {', '.join(m.class_names)}",
            f"modality: {', '.join(m.modality)}",
            f"input: {pre.channels}x{pre.input_size}x{pre.input_size} (resize {pre.resize}, "
            f"intensity {pre.intensity})",
            f"student: {m.student.architecture}"
            + (f", {m.student.params:,} params" if m.student.params else "")
            + (f", ONNX {m.student.onnx}" if m.student.onnx else "")
            + (f", INT8 {m.student.onnx_int8}" if m.student.onnx_int8 else ""),
        ]
        if m.teacher is not None:
            lines.append(
                f"teacher: {m.teacher.architecture}"
                + (f", {m.teacher.params:,} params" if m.teacher.params else "")
            )
        lines.append(f"calibration temperature: {m.calibration.temperature:g}")
        if m.ood is not None:
            lines.append(f"OOD guard: {m.ood.method}, threshold {m.ood.threshold:.3g}")
        for key, metric in m.metrics.items():
            ci = (
                f" (95% CI {metric.ci_low:.3f}-{metric.ci_high:.3f})"
                if metric.ci_low is not None and metric.ci_high is not None
                else ""
            )
            lines.append(f"metric {key}: {metric.value:.3f}{ci}" + (f" on {m.metrics_split}" if
                                                                       m.metrics_split else ""))
        flags = [f for f, on in (("DEMO", m.demo), ("SYNTHETIC DATA", m.synthetic_data)) if on]
        if flags:
            lines.append("labels: " + ", ".join(flags))
        lines.append(f"intended use: {m.intended_use}")
        return lines


def _import_custom_architectures() -> None:
    """Register the project's own architectures (DenseNet-40, ghost ResNet50...) when present."""
    try:
        import kdviewer.models.custom_arch  # noqa: F401
    except ImportError as exc:  # only a missing module is fine; a broken one should be visible
        if getattr(exc, "name", "") != "kdviewer.models.custom_arch":
            log.warning("could not import kdviewer.models.custom_arch: %s", exc)


def open_bundle(path: str | Path) -> Bundle:
    """Open a bundle folder, a .zip of one, or a ``manifest.json`` path; validate everything it names."""
    src = Path(path).expanduser()
    if not src.exists():
        raise BundleError(f"{src}: model bundle not found")
    tmp: str | None = None
    zip_root = None
    if src.is_dir():
        root = src
    elif src.name == MANIFEST_NAME:
        root = src.parent
    elif zipfile.is_zipfile(src):
        clean_cache()
        extracted = _extract_cached(src)
        root = _find_root(extracted)
        zip_root: Path | None = extracted
    else:
        raise BundleError(f"{src}: not a model bundle (expected a folder or a .zip with {MANIFEST_NAME})")
    try:
        manifest = read_manifest(root)
        bundle = Bundle(root=root, manifest=manifest, source=src, _tmp=tmp)
    except BundleError as exc:
        if zip_root is None:
            raise
        # Name the .zip the user gave, not our private extraction folder.
        raise BundleError(str(exc).replace(str(root), f"{src}!")) from exc
    missing = []
    for what, name in _named_files(manifest):
        try:
            bundle.path(name)
        except BundleError as exc:
            missing.append(f"  {what}: {exc}".replace(f"{src}: ", ""))
    if not manifest.student.onnx and not manifest.student.weights:
        missing.append("  student: neither an ONNX file nor a weights file is named")
    if missing:
        bundle.close()
        raise BundleError(f"{src}: incomplete model bundle:\n" + "\n".join(missing))
    ood = manifest.ood
    if ood is not None and ood.method == "mahalanobis" and ood.stats:
        from kdviewer.models.ood_stats import read_ood_stats

        try:  # the statistics are part of what `info` vouches for: NaN or lying headers are refused here
            read_ood_stats(bundle.path(ood.stats))
        except (ValueError, OSError) as exc:
            bundle.close()
            raise BundleError(f"{src}: OOD statistics {ood.stats} unreadable: {exc}") from exc
    return bundle


def _resource_roots() -> list[Path]:
    """resources/ candidates: $KDVIEWER_RESOURCES, a frozen app's data folder, the project checkout,
    package resources (the same order as `kdviewer.gui.logic.resources_dir`)."""
    roots: list[Path] = []
    env = os.environ.get("KDVIEWER_RESOURCES")
    if env:
        roots.append(Path(env))
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        roots.append(Path(frozen) / "resources")
    pkg = Path(__file__).resolve().parents[1]  # .../kdviewer
    roots += [pkg.parent / "resources", pkg / "resources"]
    try:
        from importlib.resources import files

        roots.append(Path(str(files("kdviewer").joinpath("resources"))))
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return roots


def _shipped_bundle(where: tuple[str, str]) -> Path | None:
    folder, name = where
    for root in _resource_roots():
        for candidate in (root / folder / name, root / folder / (name + ".zip")):
            if (candidate / MANIFEST_NAME).is_file() or (candidate.is_file() and candidate.suffix == ".zip"):
                return candidate
    return None


def demo_bundle_path() -> Path | None:
    """The synthetic demo bundle (resources/demo/cxr_demo), or None when it is not installed."""
    return _shipped_bundle(DEMO_BUNDLE)


def default_bundle_path() -> Path:
    """The model used when none is given: $KDVIEWER_BUNDLE, else the shipped real-data model
    (resources/models/kermany_cxr), else — in an install without it — the synthetic demo bundle.

    Resources are looked up in a frozen app's data folder, the project checkout (``<repo>/resources``)
    and package resources (``kdviewer/resources``).
    """
    env = os.environ.get("KDVIEWER_BUNDLE")
    if env:
        p = Path(env).expanduser()
        if p.exists():
            return p
        raise BundleError(f"KDVIEWER_BUNDLE points to {p}, which does not exist")
    found = _shipped_bundle(DEFAULT_BUNDLE) or _shipped_bundle(DEMO_BUNDLE)
    if found is None:
        raise BundleError(
            "no model given and no bundled model (resources/models/kermany_cxr) is installed; "
            "pass --model PATH to a bundle folder or .zip"
        )
    return found
