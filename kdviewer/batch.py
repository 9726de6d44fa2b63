"""Folder classification: scan, decode in worker processes, infer in batches, write rows as they finish.

Used by ``kdviewer classify`` and the GUI batch panel (no Qt here; progress goes through a callback,
cancellation through a `threading.Event`).

* `scan` walks a folder recursively and recognises images by content (PNG/JPEG/TIFF/DICOM); DICOM
  slices of one CT series become one *series* case. Files that are not images (``labels.csv``,
  ``notes.txt``, a results CSV) and kdviewer's own outputs (heatmap PNGs) are *skipped*: counted and
  named in the summary, never rows. A file that should be an image (an image extension, or none, as
  DICOM files often have) but cannot be recognised becomes an *error* row (never a failure of the run).
* The default output (`default_output`) lies outside the folder being classified:
  ``./kdviewer-results/<folder name>-<hash of its path>.csv`` (the same command resumes into the same
  file; next to the folder when the current directory is inside it).
* `run_batch` decodes and preprocesses in a spawn-safe process pool (workers return float arrays and
  metadata only), runs the deployed student (ONNX Runtime) on batches in the main process, and writes
  each row to the CSV (and optional JSONL) immediately, flushed. A restarted run with the same output
  reads the rows already there (dropping a torn last line from a killed run) and skips those cases,
  so every file ends up exactly once.

CSV columns: path, case_type (image | series | error), study_uid, series_uid, sop_uid, label, refused,
prob_<class>..., [multi-label: above_<finding>... (1 when the finding's probability is at or above the
bundle's threshold for it, else 0; ``label`` lists those findings, most probable first)], teacher_label,
teacher_prob_<class>... (with a teacher), disagreement, divergence, ood_score, ood_flag, error, t_decode_ms,
t_infer_ms, n_frames, n_found, warning, heatmap (Grad-CAM of the answer, or of ``heatmap_target``). For a
series,
``path`` is the folder of its slices (``folder#SeriesInstanceUID`` when one folder holds several
series) and the probabilities are the series aggregate (see `kdviewer.inference.predict`); ``n_frames``
slices were used of the ``n_found`` found, every slice left out has its own error row, and ``warning``
says so on the series row.

Hostile inputs: ``path`` is stored exactly (runs of spaces, tabs, newlines: the CSV quotes them, and the
torn-tail repair respects quotes) so a rerun finds every row; other text cells never start a formula
and hold no control characters (`kdviewer.sanitize`); an existing output that is not a results file of
ours is refused before anything is written; decoder processes exit when the run is killed.

Modality gate: a case whose DICOM modality the bundle does not read (a CT series given to a radiograph
model) is not run through the model: ``label`` and the probabilities are empty and ``refused`` holds the
reason. An OOD-flagged case keeps the model's label and probabilities in the CSV (``ood_flag`` true) for
analysis; every human-facing surface shows it as "no reliable answer".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdviewer.errors import KDViewerError
from kdviewer.inference.ood import DomainShift, domain_shift
from kdviewer.sanitize import csv_path, csv_text

if TYPE_CHECKING:
    from kdviewer.imaging.study import Study
    from kdviewer.models.bundle import Bundle

log = logging.getLogger(__name__)

CaseType = str  # "image" | "series" | "error" | "skipped" (not an image: counted, never a row)
#: What every human-facing surface says instead of a label when the OOD guard fired.
NO_RELIABLE_ANSWER = "no reliable answer"


class BatchError(KDViewerError):
    """The batch run itself cannot proceed (bad folder, unwritable or incompatible output file)."""


@dataclass(frozen=True)
class Case:
    """One row of the output: an image file, a CT series (several files) or an unreadable file."""

    path: str
    case_type: CaseType
    files: tuple[str, ...] = ()
    error: str = ""
    series_uid: str = ""
    study_uid: str = ""


@dataclass
class BatchProgress:
    done: int  # cases finished in this run (not counting those skipped on resume)
    total: int  # cases to do in this run
    skipped: int  # cases already in the output (resume)
    errors: int
    elapsed_s: float
    rate: float  # cases per second
    eta_s: float | None
    current: str = ""


@dataclass
class BatchSummary:
    out_csv: Path
    total_cases: int
    processed: int
    skipped: int
    errors: int
    ood_flagged: int
    disagreements: int
    elapsed_s: float
    images_per_s: float
    cancelled: bool = False
    json_out: Path | None = None
    label_counts: dict[str, int] = field(default_factory=dict)
    # OOD flags over every row of the output (earlier runs of a resumed batch too); None without a guard
    shift: DomainShift | None = None
    refused: int = 0  # cases the modality gate gave no class (see the 'refused' column)
    skipped_files: list[str] = field(default_factory=list)  # not images / our own outputs (no rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_csv"] = str(self.out_csv)
        d["json_out"] = None if self.json_out is None else str(self.json_out)
        if self.shift is not None:
            d["shift"].update(expected=self.shift.expected, shifted=self.shift.shifted)
        return d


# -------------------------------------------------------------------------------------------- scan


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


#: Extensions of files that are meant to be images: unrecognised ones are errors, not skipped files.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".dic", ".ima"})
#: The PNG text chunk that marks kdviewer's own heatmaps (never classified as cases).
HEATMAP_MARK = ("Software", "kdviewer heatmap")
_HEATMAP_NAME = re.compile(r"\.[0-9a-f]{8}\.png$")


def default_output(folder: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """Where results of ``folder`` go by default: ``<base>/kdviewer-results/<name>-<hash>.csv``.

    ``base`` is the current directory (the CLI) or the home folder (the GUI); when it lies inside
    ``folder``, the parent of ``folder`` is used instead, so results never land in the input. The
    name is stable (the hash is of the folder's absolute path), so rerunning resumes.
    """
    src = Path(folder).expanduser().resolve()
    root = Path(base).expanduser().resolve() if base is not None else Path.cwd().resolve()
    if root == src or src in root.parents:
        root = src.parent
    tag = hashlib.sha1(str(src).encode("utf-8")).hexdigest()[:6]
    return root / "kdviewer-results" / f"{src.name or 'root'}-{tag}.csv"


def _is_our_heatmap(path: Path) -> bool:
    if not _HEATMAP_NAME.search(path.name):
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get(HEATMAP_MARK[0]) == HEATMAP_MARK[1]
    except Exception:
        return False


def _why_not_image(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    if size == 0:
        return "empty file (0 bytes)"
    return "not a supported image (PNG, JPEG, TIFF or DICOM expected)"


def scan(folder: str | os.PathLike[str]) -> list[Case]:
    """All cases under ``folder`` (recursive, hidden files skipped), sorted by path."""
    from kdviewer.imaging.formats import sniff
    from kdviewer.imaging.series import scan_series

    root = Path(folder)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    else:
        raise BatchError(f"{root}: folder not found")
    cases: list[Case] = []
    dicoms: list[Path] = []
    for p in files:
        kind = sniff(p)
        if kind is None:
            if p.suffix == "" or p.suffix.lower() in IMAGE_SUFFIXES:
                cases.append(Case(str(p), "error", (str(p),), _why_not_image(p)))
            else:  # labels.csv, notes.txt, a results file: not a case
                cases.append(Case(str(p), "skipped", (str(p),), "not an image"))
        elif kind == "png" and _is_our_heatmap(p):
            cases.append(Case(str(p), "skipped", (str(p),), "a kdviewer heatmap"))
        elif kind == "dicom":
            dicoms.append(p)
        else:
            cases.append(Case(str(p), "image", (str(p),)))
    grouped: set[Path] = set()
    if dicoms:
        try:
            series = scan_series(dicoms)
        except KDViewerError as exc:  # never fatal: fall back to one case per file
            log.warning("could not group DICOM series: %s", exc)
            series = []
        multi = [s for s in series if s.n_files > 1 and s.modality == "CT"]
        folders: dict[Path, int] = {}
        for s in multi:
            common = Path(os.path.commonpath([str(p) for p in s.paths]))
            folders[common] = folders.get(common, 0) + 1
        for s in multi:
            common = Path(os.path.commonpath([str(p) for p in s.paths]))
            name = str(common) if folders[common] == 1 else f"{common}#{s.series_uid}"
            cases.append(
                Case(name, "series", tuple(str(p) for p in s.paths), series_uid=s.series_uid,
                     study_uid=s.study_uid)
            )
            grouped.update(s.paths)
    cases.extend(Case(str(p), "image", (str(p),)) for p in dicoms if p not in grouped)
    cases.sort(key=lambda c: c.path)
    return cases


# ------------------------------------------------------------------------------------ worker side


_PRE_CACHE: dict[str, Any] = {}


def load_case(case: Case) -> Study:
    """Decode a case into a `Study` (a file, or the slices of a series)."""
    if case.case_type == "series":
        from kdviewer.imaging.series import load_series

        return load_series([Path(p) for p in case.files])
    from kdviewer.imaging import load

    return load(Path(case.files[0] if case.files else case.path))


def _decode_case(case: Case, pre_json: str) -> dict[str, Any]:
    """Worker: load + preprocess one case. Returns plain data (arrays and strings) only."""
    from kdviewer.models.manifest import Preprocessing
    from kdviewer.models.preprocess import preprocess_frame

    pre = _PRE_CACHE.get(pre_json)
    if pre is None:
        pre = _PRE_CACHE[pre_json] = Preprocessing.model_validate_json(pre_json)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"path": case.path, "array": None, "error": "", "uids": {}, "n_frames": 0,
                           "dropped": [], "n_found": None}
    try:
        study = load_case(case)
        idx = list(range(study.n_frames)) if study.is_volume else [study.middle_index()]
        # filled in place: a list of slices plus np.stack would hold the model input twice
        array = np.empty((len(idx), pre.channels, pre.input_size, pre.input_size), np.float32)
        for j, i in enumerate(idx):
            array[j] = preprocess_frame(study.frames[i], pre, study)
        out["array"] = array
        out["uids"] = dict(study.uids)
        out["n_frames"] = len(idx)
        out["modality"] = study.modality
        out["dropped"] = [(str(p), _one_line(why)) for p, why in study.dropped]
        out["n_found"] = study.n_found
    except KDViewerError as exc:
        out["error"] = _one_line(exc)
    except MemoryError:
        out["error"] = "not enough memory to decode this image"
    except Exception as exc:  # a decoder bug must cost one row, not the whole run
        out["error"] = _one_line(f"could not decode: {type(exc).__name__}: {exc}")
    except BaseException as exc:
        from kdviewer.imaging.dicom import is_decoder_panic

        if not is_decoder_panic(exc):  # KeyboardInterrupt / SystemExit go on
            raise
        out["error"] = _one_line(f"the decoder failed on this file (damaged data): {exc}")
    out["t_decode_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def _decoder_context() -> Any:
    """How decoder processes start: ``fork`` on Linux when called from the main thread (the command
    line, scripts: a worker starts in milliseconds with numpy, Pillow and pydicom already loaded, where a
    spawned one imports them first; ``benchmarks/batch_throughput.py``: first row ~0.35 s sooner and
    ~20% more images/s on 480 files), ``spawn`` elsewhere: the GUI runs batches on a QThread of a Qt
    process, which must not be forked, and macOS / Windows do not fork safely."""
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _worker_init(parent_pid: int) -> None:
    """Decoder process start-up: exit as soon as the parent is gone (killed with -9, say), so that no
    decoder (and, once they are all gone, no resource tracker) outlives a killed run."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="kdviewer-parent-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------ output


def csv_columns(class_names: list[str], teacher: bool, multi_label: bool = False) -> list[str]:
    cols = ["path", "case_type", "study_uid", "series_uid", "sop_uid", "label", "refused"]
    cols += [f"prob_{c}" for c in class_names]
    if multi_label:
        cols += [f"above_{c}" for c in class_names]
    if teacher:
        cols += ["teacher_label"] + [f"teacher_prob_{c}" for c in class_names]
    cols += ["disagreement", "divergence", "ood_score", "ood_flag", "error", "t_decode_ms", "t_infer_ms",
             "n_frames", "n_found", "warning", "heatmap"]
    return cols


def _record_end(data: bytes) -> int:
    """Offset just after the last complete CSV record of ``data``: a newline outside quotes (a path may
    hold a quoted newline; doubled quotes keep the count of quote characters even)."""
    end = len(data)
    while True:
        nl = data.rfind(b"\n", 0, end)
        if nl < 0:
            return 0
        if data.count(b'"', 0, nl) % 2 == 0:
            return nl + 1
        end = nl


def _repair_torn_tail(path: Path, csv_records: bool = True) -> None:
    """Cut a partial last record left by a killed run."""
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data:
            return
        cut = _record_end(data) if csv_records else data.rfind(b"\n") + 1
        if cut == len(data):
            return
        fh.seek(cut)
        fh.truncate()


_HEADER_PREFIX = "path,case_type,"


def check_output_is_ours(out_csv: Path, columns: list[str]) -> None:
    """Refuse, *before anything is written*, an existing output that is not a results CSV of ours
    (a note, an image...) or one of another model: kdviewer never modifies a file that is not its own."""
    if not out_csv.exists():
        return
    if not out_csv.is_file():
        raise BatchError(f"{out_csv} is not a regular file; choose a .csv file name for the results")
    if out_csv.stat().st_size == 0:
        return
    with open(out_csv, "rb") as fh:
        head = fh.read(64 * 1024)
    first = head.split(b"\n", 1)[0]
    try:
        header = next(csv.reader([first.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error):
        header = []
    if header == columns:
        return
    if first.startswith(_HEADER_PREFIX.encode()):
        raise BatchError(
            f"{out_csv} already holds results with different columns (another model or --teacher "
            "setting); choose another output file or delete it to start over"
        )
    raise BatchError(
        f"{out_csv} exists and is not a kdviewer results file (its first line is not the results "
        "header); it was left untouched: choose another output file name"
    )


def check_json_is_ours(json_path: Path) -> None:
    """The same for the ``--json`` output: an existing file must be a JSON array (.json) or JSON
    lines (.jsonl) of result rows, else it is refused untouched."""
    if not json_path.exists() or (json_path.is_file() and json_path.stat().st_size == 0):
        return
    if not json_path.is_file():
        raise BatchError(f"{json_path} is not a regular file; choose another --json file name")
    with open(json_path, "rb") as fh:
        head = fh.read(64 * 1024)
    ours = False
    if json_path.suffix.lower() == ".jsonl":
        try:
            ours = isinstance(obj := json.loads(head.split(b"\n", 1)[0]), dict) and "path" in obj
        except ValueError:
            ours = False
    else:
        ours = head.lstrip().startswith(b"[")
        if ours:
            try:
                data = json.loads(json_path.read_bytes())
                ours = isinstance(data, list) and all(isinstance(r, dict) and "path" in r for r in data)
            except ValueError:
                ours = False
    if not ours:
        raise BatchError(
            f"{json_path} exists and is not a kdviewer results file; it was left untouched: choose "
            "another --json file name"
        )


def read_done(out_csv: Path, columns: list[str]) -> list[dict[str, str]]:
    """Rows already in ``out_csv`` (after repairing a torn tail); BatchError if it is not ours or its
    columns differ (checked before any repair)."""
    check_output_is_ours(out_csv, columns)
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return []
    _repair_torn_tail(out_csv)
    with open(out_csv, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return []
        return [dict(zip(columns, row, strict=True)) for row in reader if len(row) == len(columns)]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}"
    if isinstance(v, int | np.integer):
        return str(int(v))
    return csv_text(v)


def _cell(column: str, v: Any) -> str:
    """One CSV cell: the path exactly as on disk (resume finds the file again), all other text one
    line, without control characters and never a spreadsheet formula."""
    if column == "path" and isinstance(v, str):
        return csv_path(v)
    return _fmt(v)


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """CSV strings -> JSON values (numbers, booleans, null)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v == "":
            out[k] = None
        elif v in ("true", "false"):
            out[k] = v == "true"
        elif k.startswith(("prob_", "teacher_prob_")) or k in ("divergence", "ood_score", "t_decode_ms",
                                                               "t_infer_ms"):
            out[k] = float(v)
        elif k in ("n_frames", "n_found") or k.startswith("above_"):
            out[k] = int(v)
        else:
            out[k] = v
    return out


class _Writer:
    def __init__(self, out_csv: Path, columns: list[str], jsonl: Path | None,
                 done_rows: list[dict[str, str]] | None = None) -> None:
        self.columns = columns
        fresh = not out_csv.exists() or out_csv.stat().st_size == 0
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(out_csv, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.writer(self.fh, lineterminator="\n")
        if fresh:
            self.writer.writerow(columns)
            self.fh.flush()
        self.jfh = None
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            have: set[str] = set()
            if jsonl.exists():
                _repair_torn_tail(jsonl, csv_records=False)
                with open(jsonl, encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            have.add(str(json.loads(line).get("path")))
                        except (ValueError, AttributeError):
                            continue
            self.jfh = open(jsonl, "a", encoding="utf-8")  # noqa: SIM115
            # a run killed between its CSV and JSONL writes: the CSV rows the JSONL lacks go in now
            for r in done_rows or []:
                if r["path"] not in have:
                    self.jfh.write(json.dumps(_typed(r)) + "\n")
            self.jfh.flush()

    def write(self, row: dict[str, Any]) -> dict[str, str]:
        cells = {c: _cell(c, row.get(c)) for c in self.columns}
        self.writer.writerow([cells[c] for c in self.columns])
        self.fh.flush()
        if self.jfh is not None:
            self.jfh.write(json.dumps(_typed(cells)) + "\n")
            self.jfh.flush()
        return cells

    def close(self) -> None:
        self.fh.close()
        if self.jfh is not None:
            self.jfh.close()


# --------------------------------------------------------------------------------------------- run


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path.split("#", 1)[0])) + (
        "#" + path.split("#", 1)[1] if "#" in path else ""
    )


def _decode_inline(cases: list[Case], pre_json: str) -> Iterator[dict[str, Any]]:
    for c in cases:
        yield _decode_case(c, pre_json)


def run_batch(
    folder: str | os.PathLike[str],
    bundle: Bundle | str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    json_out: str | os.PathLike[str] | None = None,
    teacher: bool = False,
    heatmaps_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    batch_size: int = 16,
    threads: int = 2,
    use_int8: bool | str = "auto",
    progress: Callable[[BatchProgress], None] | None = None,
    cancel: threading.Event | None = None,
    cases: list[Case] | None = None,
    on_result: Callable[[Any, Case, Any, Any], None] | None = None,
    deidentify: bool = False,
    heatmap_target: str | None = None,
    cluster: str | None = None,
) -> BatchSummary:
    """Classify every case under ``folder``; see the module docstring. Raises only for run failures
    (`BatchError`, `BundleError`); unreadable files become rows with an ``error``.

    ``json_out``: a ``.jsonl`` path is appended row by row as the CSV is; any other name gets a JSON
    array of all rows (this run and earlier ones) written at the end.

    ``on_result(classifier, case, prediction, comparison)`` is called for every classified case just
    before its row is written (``kdviewer classify --dicom-out`` writes the DICOM objects there), so a
    run killed in between redoes both on resume. It must handle its own errors; a `KDViewerError` that
    escapes is logged and the row is still written.

    ``deidentify``: paths are written relative to ``folder`` and every DICOM UID is replaced by a
    pseudonym (`pseudonymize_uid`: the same UID always gets the same replacement on this machine), so
    the output can leave the hospital without the identifiers the paths and UIDs carry.

    ``workers`` and ``threads`` are capped at the machine's cores (with a warning).

    ``heatmap_target``: the class / finding every heatmap explains (default: each case's own answer; for
    a multi-label model the finding furthest above its threshold).

    ``cluster`` (``"local"``, ``"local:N"`` or a scheduler address ``tcp://HOST:8786``): decode and
    infer on Dask workers instead of the local pool (`kdviewer.batch_cluster`; Dask is imported only
    then). Rows, resume and progress are the same; ``workers`` is not used and ``on_result`` is not
    supported (the predictions stay on the workers).
    """
    from kdviewer.inference.predict import Classifier, cap_to_cores

    t_start = time.perf_counter()
    workers = cap_to_cores(workers, "decoder processes (--workers)")
    threads = cap_to_cores(threads, "inference threads (--threads)")
    out_csv = Path(out_csv)
    json_path = Path(json_out) if json_out else None
    jsonl = json_path if json_path is not None and json_path.suffix.lower() == ".jsonl" else None
    if json_path is not None:
        check_json_is_ours(json_path)
    if cluster is not None and on_result is not None:
        raise BatchError("writing DICOM results (--dicom-out) is not supported with --cluster; run it "
                         "without --cluster")
    connection = None
    if cluster is not None:
        from kdviewer.batch_cluster import ClusterConnection, parse_cluster

        # a malformed address fails before anything is read or written; a local cluster starts now,
        # in the background, while this process opens its bundle and lists the folder
        connection = ClusterConnection(parse_cluster(cluster))
    try:
        # with decoder processes beside it, ORT must not spin-wait on the cores they decode on
        clf = Classifier(bundle, use_int8=use_int8, threads=threads, load_teacher=teacher,  # type: ignore[arg-type]
                         spin=workers <= 0 or connection is not None)
        names = clf.class_names
        if heatmap_target is not None and heatmap_target not in names:
            raise BatchError(f"unknown finding {heatmap_target!r} for the heatmaps; this model's classes: "
                             + ", ".join(names))
        columns = csv_columns(names, teacher, clf.multi_label)
        done_rows = read_done(out_csv, columns)
        done = {_norm(r["path"]) for r in done_rows}
        all_cases = scan(folder) if cases is None else cases
        shown = _Shown(Path(folder), deidentify)
        # never classify what is not an image, nor this run's own outputs (when they lie inside the folder)
        ours = {_norm(str(p)) for p in (out_csv, json_path) if p is not None}
        heat_root = os.path.abspath(heatmaps_dir) + os.sep if heatmaps_dir else None
        skipped_files = [c.path for c in all_cases if c.case_type == "skipped" or _norm(c.path) in ours
                         or (heat_root is not None and os.path.abspath(c.path).startswith(heat_root))]
        if skipped_files:
            gone = set(skipped_files)
            all_cases = [c for c in all_cases if c.path not in gone]
        todo = [c for c in all_cases if _norm(shown.path(c.path)) not in done]
        skipped = len(all_cases) - len(todo)
        heat_dir = Path(heatmaps_dir) if heatmaps_dir else None
        if heat_dir is not None:
            heat_dir.mkdir(parents=True, exist_ok=True)
        try:
            writer = _Writer(out_csv, columns, jsonl, done_rows)
        except OSError as exc:
            raise BatchError(f"cannot write {out_csv}: {exc.strerror or exc}") from exc
    except BaseException:
        if connection is not None:
            connection.close()
        raise

    stats = {"done": 0, "errors": 0, "ood": 0, "disagree": 0, "images": 0, "refused": 0}
    # OOD flags over the whole output, rows of earlier runs included (the set-level domain-shift test)
    earlier_flags = [r["ood_flag"] for r in done_rows if r.get("ood_flag") in ("true", "false")]
    ood_all = {"scored": len(earlier_flags), "flagged": earlier_flags.count("true")}
    labels: dict[str, int] = {}
    cancelled = False
    pre_json = clf.pre.model_dump_json()

    def report(current: str) -> None:
        if progress is None:
            return
        el = time.perf_counter() - t_start
        rate = stats["done"] / el if el > 0 else 0.0
        left = len(todo) - stats["done"]
        progress(BatchProgress(stats["done"], len(todo), skipped, stats["errors"], el, rate,
                               left / rate if rate > 0 else None, current))

    def emit(row: dict[str, Any]) -> None:
        row = shown.row(row)
        writer.write(row)
        stats["done"] += 1
        if row.get("error"):
            stats["errors"] += 1
        if row.get("ood_flag"):
            stats["ood"] += 1
        if row.get("ood_flag") is not None:
            ood_all["scored"] += 1
            ood_all["flagged"] += bool(row["ood_flag"])
        if row.get("disagreement"):
            stats["disagree"] += 1
        if row.get("refused"):
            stats["refused"] += 1
        if row.get("label"):  # an OOD-flagged case is counted as what it is: no reliable answer
            key = NO_RELIABLE_ANSWER if row.get("ood_flag") else row["label"]
            labels[key] = labels.get(key, 0) + 1
        report(row["path"])

    by_path = {c.path: c for c in todo}

    def result_hook(case: Case, pred: Any, comp: Any) -> None:
        if on_result is None:
            return
        try:
            on_result(clf, case, pred, comp)
        except KDViewerError as exc:
            log.warning("%s: %s", case.path, exc)

    def emit_dropped(res: dict[str, Any]) -> None:
        """One error row per damaged slice a series left out (before the series row; once only)."""
        for slice_path, why in res.get("dropped") or []:
            key = _norm(shown.path(slice_path))
            if key in done:
                continue
            done.add(key)
            emit({"path": slice_path, "case_type": "error", "error": f"slice left out of its series: {why}",
                  "t_decode_ms": None})

    def flush(buffer: list[dict[str, Any]]) -> None:
        if not buffer:
            return
        for case, res, row, pred, comp in infer_rows(clf, [(by_path[b["path"]], b) for b in buffer], teacher,
                                                     heat_dir, deidentify, heatmap_target):
            if pred is not None:
                result_hook(case, pred, comp)
            emit_dropped(res)
            emit(row)
        stats["images"] += sum(len(b["array"]) for b in buffer)
        buffer.clear()

    buffer: list[dict[str, Any]] = []
    pool: ProcessPoolExecutor | None = None
    try:
        # Error cases from the scan need no decoding.
        for c in [c for c in todo if c.case_type == "error"]:
            emit(_row(c, {"t_decode_ms": 0.0}, None, None, names, error=c.error))
        pending_cases = [c for c in todo if c.case_type != "error"]
        results: Iterator[dict[str, Any]]
        if connection is not None:
            from kdviewer.batch_cluster import cluster_results

            bundle_ref = str(clf.bundle.source)
            for item in cluster_results(connection, pending_cases, bundle_ref, teacher=teacher,
                                        use_int8=use_int8, threads=threads, batch_size=batch_size,
                                        heat_dir=heat_dir, anonymous=deidentify,
                                        heatmap_target=heatmap_target, cancel=cancel):
                key = _norm(shown.path(item["path"]))
                if key in done:  # a batch delivered twice (rescheduled after its worker died): once only
                    continue
                done.add(key)
                emit_dropped(item)
                emit(item["row"])
                stats["images"] += item["n_images"]
            cancelled = cancel is not None and cancel.is_set()
            results = iter(())
        elif workers <= 0 or len(pending_cases) <= 1:
            results = _decode_inline(pending_cases, pre_json)
        else:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_decoder_context(),
                                       initializer=_worker_init, initargs=(os.getpid(),))
            results = _decode_pooled(pool, pending_cases, pre_json, window=max(2 * workers, batch_size),
                                     cancel=cancel)
        for res in results:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            early = row_before_model(clf, by_path[res["path"]], res)
            if early is not None:  # unreadable, or refused by the modality gate: the model is not run
                row, refused = early
                if refused is not None:
                    result_hook(by_path[res["path"]], refused, None)
                    emit_dropped(res)
                emit(row)
                continue
            buffer.append(res)
            if sum(len(b["array"]) for b in buffer) >= batch_size:
                flush(buffer)
        if not cancelled:
            flush(buffer)
        else:
            buffer.clear()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        if connection is not None:
            connection.close()
    elapsed = time.perf_counter() - t_start
    has_scores = clf.ood is not None and ood_all["scored"] > 0
    shift = domain_shift(ood_all["flagged"], ood_all["scored"]) if has_scores else None
    if json_path is not None and jsonl is None:
        rows = read_done(out_csv, columns)
        tmp = json_path.with_suffix(json_path.suffix + ".tmp")
        tmp.write_text(json.dumps([_typed(r) for r in rows], indent=1), encoding="utf-8")
        os.replace(tmp, json_path)
    return BatchSummary(
        out_csv=out_csv,
        total_cases=len(all_cases),
        processed=stats["done"],
        skipped=skipped,
        errors=stats["errors"],
        ood_flagged=stats["ood"],
        disagreements=stats["disagree"],
        refused=stats["refused"],
        skipped_files=skipped_files,
        elapsed_s=elapsed,
        images_per_s=stats["images"] / elapsed if elapsed > 0 else 0.0,
        cancelled=cancelled,
        json_out=json_path,
        label_counts=labels,
        shift=shift,
    )


def row_before_model(clf: Any, case: Case, res: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
    """The row of a decoded case that never reaches the model: (row, refused prediction or None) for
    a decoding error or a modality the bundle does not read; None when the case goes to the model.
    Shared by the local pool and the Dask workers (`kdviewer.batch_cluster`), so both write the same rows."""
    if res["error"]:
        return _row(case, res, None, None, clf.class_names, error=res["error"]), None
    reason = clf.refusal(res.get("modality"))
    if reason is None:
        return None
    refused = clf.refused_prediction(reason)
    return _row(case, res, refused, None, clf.class_names), refused


def infer_rows(
    clf: Any,
    items: list[tuple[Case, dict[str, Any]]],
    teacher: bool,
    heat_dir: Path | None = None,
    anonymous: bool = False,
    heatmap_target: str | None = None,
) -> list[tuple[Case, dict[str, Any], dict[str, Any], Any, Any]]:
    """Run the model on one batch of decoded cases: (case, decoded, row, prediction, comparison) each,
    in order. A model failure becomes error rows (prediction None), never an exception. Shared by the
    local pool and the Dask workers."""
    if not items:
        return []
    names = clf.class_names
    arrays = [res["array"] for _, res in items]
    t0 = time.perf_counter()
    try:
        if teacher:
            comps = clf.compare_batch(arrays)
            preds = [c.student for c in comps]
        else:
            comps = None
            preds = clf.predict_batch(arrays)
    except KDViewerError as exc:  # e.g. an input the model cannot take: rows, not a crash
        return [(case, res, _row(case, res, None, None, names, error=_one_line(exc)), None, None)
                for case, res in items]
    per_img = (time.perf_counter() - t0) * 1e3 / max(1, sum(len(a) for a in arrays))
    out = []
    for i, (case, res) in enumerate(items):
        comp = comps[i] if comps is not None else None
        row = _row(case, res, preds[i], comp, names, infer_ms=per_img * len(arrays[i]))
        if heat_dir is not None:
            row["heatmap"] = _write_heatmap(clf, case, heat_dir, preds[i], anonymous=anonymous,
                                            target=heatmap_target)
        out.append((case, res, row, preds[i], comp))
    return out


def _decode_pooled(
    pool: ProcessPoolExecutor, cases: list[Case], pre_json: str, window: int, cancel: threading.Event | None
) -> Iterator[dict[str, Any]]:
    """Submit at most ``window`` cases at a time (bounded memory); yield results as they complete."""
    queue = list(reversed(cases))
    running: set[Future[dict[str, Any]]] = set()
    futures: dict[Future[dict[str, Any]], Case] = {}
    while queue or running:
        while queue and len(running) < window and not (cancel is not None and cancel.is_set()):
            c = queue.pop()
            f = pool.submit(_decode_case, c, pre_json)
            running.add(f)
            futures[f] = c
        if not running:
            return
        finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        for f in finished:
            c = futures.pop(f)
            try:
                yield f.result()
            except Exception as exc:  # a worker died (e.g. killed by the OOM killer)
                from concurrent.futures.process import BrokenProcessPool

                why = (f"the decoder process died while reading this file ({exc}); it may need more "
                       "memory than is free" if isinstance(exc, BrokenProcessPool) else f"{exc}")
                yield {"path": c.path, "array": None, "uids": {}, "n_frames": 0, "t_decode_ms": 0.0,
                       "error": _one_line(f"decoder process failed: {type(exc).__name__}: {why}")}


def _row(
    case: Case,
    res: dict[str, Any],
    pred: Any,
    comp: Any,
    names: list[str],
    *,
    error: str = "",
    infer_ms: float | None = None,
) -> dict[str, Any]:
    uids = res.get("uids") or {}
    row: dict[str, Any] = {
        "path": case.path,
        "case_type": "error" if error else case.case_type,
        "study_uid": uids.get("StudyInstanceUID", case.study_uid),
        "series_uid": uids.get("SeriesInstanceUID", case.series_uid),
        "sop_uid": uids.get("SOPInstanceUID", ""),
        "error": error,
        "t_decode_ms": res.get("t_decode_ms"),
        "t_infer_ms": infer_ms,
        "n_frames": res.get("n_frames") or None,
        "n_found": res.get("n_found"),
    }
    dropped = res.get("dropped") or []
    if dropped and not error:
        row["warning"] = (
            f"{len(dropped)} of {res.get('n_found')} slices could not be read and were left out (see "
            "their error rows): a finding on them cannot be seen"
        )
    if pred is not None and pred.refused is not None:
        row["label"] = ""
        row["refused"] = pred.refused
    elif pred is not None:
        row["label"] = pred.label
        for n, p in zip(names, pred.probabilities, strict=True):
            row[f"prob_{n}"] = float(p)
        if pred.thresholds is not None:
            for n, p, t in zip(names, pred.probabilities, pred.thresholds, strict=True):
                row[f"above_{n}"] = int(p >= t)
        row["ood_score"] = pred.ood_score
        row["ood_flag"] = pred.ood_flag
    if comp is not None:
        row["teacher_label"] = comp.teacher.label
        for n, p in zip(names, comp.teacher.probabilities, strict=True):
            row[f"teacher_prob_{n}"] = float(p)
        row["disagreement"] = comp.disagree
        row["divergence"] = comp.divergence
    return row


def _write_heatmap(
    clf: Any, case: Case, heat_dir: Path, pred: Any, anonymous: bool = False, target: str | None = None
) -> str:
    """Grad-CAM overlay PNG of the predicted class, or of ``target`` (middle slice for a series); ''
    when impossible.

    ``anonymous`` (``--deidentify``): the file is named by a hash only, never by the case's file name."""
    from PIL import Image, PngImagePlugin

    from kdviewer.imaging.windowing import display_frame
    from kdviewer.inference.saliency import explain, overlay

    try:
        study = load_case(case)
        smap = explain(clf, study, pred, target=target)  # on the slice that drove a series aggregate
        if smap is None:
            return ""
        rgb = overlay(display_frame(study, smap.frame), smap.heatmap)
        del study, smap
        stem = "case" if anonymous else (Path(case.path.split("#", 1)[0]).name or "case")
        tag = hashlib.sha1(case.path.encode("utf-8")).hexdigest()[:8]
        out = heat_dir / f"{stem}.{tag}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text(*HEATMAP_MARK)  # so that a later batch over a folder holding it skips it
        Image.fromarray(rgb).save(out, pnginfo=info)
    except Exception as exc:  # MemoryError, OSError, a CAM bug...: this row loses its heatmap, not the run
        log.warning("no heatmap for %s: %s: %s", case.path, type(exc).__name__, exc)
        return ""
    return str(out)


def _pseudonym_key() -> bytes:
    """This user's secret for `Pseudonymizer` (created once, readable by the user only)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kdviewer"
    key_file = base / "deidentify.key"
    try:
        return bytes.fromhex(key_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        pass
    base.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    tmp = key_file.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex())
    os.replace(tmp, key_file)
    return key


def pseudonymize_uid(uid: str, key: bytes) -> str:
    """A DICOM UID replaced by ``2.25.<HMAC-SHA256 of it>``: the same UID always gives the same
    pseudonym under one key, and the original cannot be recovered without the key."""
    import hmac

    digest = hmac.new(key, uid.encode("utf-8"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


class _Shown:
    """How a row appears in the output: as is, or de-identified (relative paths, pseudonymous UIDs)."""

    def __init__(self, folder: Path, deidentify: bool) -> None:
        self.deidentify = deidentify
        self.root = folder if folder.is_dir() else folder.parent
        self.prefix = str(self.root).rstrip(os.sep) + os.sep
        self.key = _pseudonym_key() if deidentify else b""

    def path(self, path: str) -> str:
        if not self.deidentify:
            return path
        main, sep, uid = path.partition("#")
        if main.startswith(self.prefix):
            main = main[len(self.prefix):]
        elif main == str(self.root):
            main = "."
        return main + (sep + pseudonymize_uid(uid, self.key) if sep else "")

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.deidentify:
            return row
        row = dict(row, path=self.path(row["path"]))
        for col in ("study_uid", "series_uid", "sop_uid"):
            if row.get(col):
                row[col] = pseudonymize_uid(str(row[col]), self.key)
        if row.get("error"):
            row["error"] = str(row["error"]).replace(self.prefix, "")
        return row


def summary_lines(s: BatchSummary, shift: bool = True) -> list[str]:
    """Human-readable summary; ``shift=False`` leaves out the domain-shift warning (shown elsewhere)."""
    buf = io.StringIO()
    buf.write(f"{s.processed} case(s) classified in {s.elapsed_s:.1f} s ({s.images_per_s:.1f} images/s)")
    if s.skipped:
        buf.write(f"; {s.skipped} already in {s.out_csv.name} (skipped)")
    lines = [buf.getvalue()]
    if s.label_counts:
        lines.append("labels: " + ", ".join(f"{k}: {v}" for k, v in sorted(s.label_counts.items())))
    if s.errors:
        lines.append(f"{s.errors} file(s) could not be read (see the 'error' column)")
    if s.skipped_files:
        names = ", ".join(Path(p).name for p in s.skipped_files[:5])
        more = f" and {len(s.skipped_files) - 5} more" if len(s.skipped_files) > 5 else ""
        lines.append(f"{len(s.skipped_files)} file(s) skipped, not images: {names}{more}")
    if s.refused:
        lines.append(f"{s.refused} case(s) refused by the modality gate: the model does not read their "
                     "modality (see the 'refused' column)")
    if s.ood_flagged:
        lines.append(f"{s.ood_flagged} case(s) flagged as unlike the training data (ood_flag)")
    if shift and s.shift is not None and s.shift.shifted:
        lines.append(s.shift.message())
    if s.disagreements:
        lines.append(f"{s.disagreements} case(s) where student and teacher disagree")
    if s.cancelled:
        lines.append("cancelled: rerun the same command to finish the rest")
    lines.append(f"results: {s.out_csv}" + (f" and {s.json_out}" if s.json_out else ""))
    return lines
