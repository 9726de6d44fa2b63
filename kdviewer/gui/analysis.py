"""The jobs the viewer runs in its workers: load a case, classify, compare, saliency, thumbnails, bundles.

Qt-free: each function takes a cancel token (anything with ``check()``) and returns plain objects, so
the same calls serve the window, `render` and the benchmark. They only *call* the imaging, models and
inference rooms; nothing here decides anything clinical.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdviewer.imaging.study import Study


class Token(Protocol):
    def check(self) -> None: ...


class _NoToken:
    def check(self) -> None:
        return None


NO_TOKEN = _NoToken()

#: torch intra-op threads for interactive work. Prediction and saliency run in two parallel workers,
#: one thread each: on a 2-core machine that uses both cores without oversubscribing them (spinning
#: OpenMP threads made torch ~10x slower when other processes competed for the cores).
DEFAULT_THREADS = 1

_locks: weakref.WeakKeyDictionary[Any, dict[str, threading.Lock]] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def thread_count(threads: int | None = None) -> int:
    """Threads per inference job: ``threads``, else $KDVIEWER_THREADS, else `DEFAULT_THREADS`."""
    try:
        env = int(os.environ.get("KDVIEWER_THREADS", "0") or 0)
    except ValueError:
        env = 0
    return max(1, threads or env or DEFAULT_THREADS)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (imports torch: call it in a worker, not on the GUI thread)."""
    n = thread_count(threads)
    try:
        import torch

        if torch.get_num_threads() != n:  # resizing the thread pool is not free: only when it changes
            torch.set_num_threads(n)
    except Exception:  # torch missing: inference will say so when it is needed
        pass
    return n


def model_lock(classifier: Any, role: str) -> threading.Lock:
    """One lock per torch network of a classifier: CAM hooks must never see another job's forward pass."""
    with _locks_guard:
        per = _locks.setdefault(classifier, {})
        return per.setdefault(role, threading.Lock())


def _student_is_torch(classifier: Any) -> bool:
    return type(getattr(classifier, "student", None)).__name__ == "TorchRuntime"


def load_case(path: str | os.PathLike, token: Token = NO_TOKEN) -> Study:
    from kdviewer.imaging import load

    token.check()
    return load(Path(path))


def load_for_display(path: str | os.PathLike, token: Token = NO_TOKEN) -> tuple[Study, np.ndarray]:
    """The study and the uint8 pixels of its middle frame in its default window (for the canvas)."""
    from kdviewer.imaging.windowing import display_frame

    study = load_case(path, token)
    token.check()
    return study, display_frame(study, study.middle_index())


def thumbnail(path: str | os.PathLike, size: int = 96, token: Token = NO_TOKEN) -> np.ndarray:
    """uint8 (h, w) preview of a case (middle frame, default window), longest side ``size``."""
    from PIL import Image

    from kdviewer.imaging.windowing import display_frame

    study = load_case(path, token)
    token.check()
    img = display_frame(study, study.middle_index())
    pil = Image.fromarray(img)
    pil.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def load_classifier(
    path: str | os.PathLike,
    load_teacher: bool = False,
    threads: int | None = None,
    warmup: bool = True,
    token: Token = NO_TOKEN,
) -> Any:
    """Open a bundle and build its `Classifier`, ready for the student's first answer.

    The deployed student runs on ONNX Runtime, so without the teacher this never imports torch (about
    6 s of a cold start on a 2-core CPU): the first answer can show while `warm_torch` prepares the
    teacher and saliency in another worker. ``warmup`` runs the student (and teacher) once on a dummy.
    """
    from kdviewer.inference.predict import Classifier

    threads = thread_count(threads)  # torch's own thread count is set when torch is first needed
    if load_teacher:
        configure_threads(threads)
    clf = Classifier(Path(path), use_int8="auto", threads=threads, load_teacher=load_teacher)
    token.check()
    if warmup:
        dummy = _dummy_study(clf)
        clf.predict(dummy)
        if load_teacher and clf.has_teacher:
            clf.predict(dummy, role="teacher")
    return clf


def warm_torch(clf: Any, token: Token = NO_TOKEN) -> None:
    """Import torch and grad-cam and build the student's torch network (and the teacher's, if the bundle
    has one) now, so that the first saliency map or teacher comparison does not pay for it."""
    from kdviewer.inference.saliency import saliency

    configure_threads(clf.threads)
    dummy = _dummy_study(clf)
    token.check()
    try:
        with model_lock(clf, "student"):
            saliency(clf, dummy, "gradcam", role="student")
    except Exception:  # saliency problems are reported when the user asks for a map
        pass
    token.check()
    if clf.has_teacher:
        try:
            with model_lock(clf, "teacher"):
                clf.predict(dummy, role="teacher")
        except Exception:  # teacher problems are reported when the user compares
            pass


def _dummy_study(clf: Any) -> Study:
    pre = clf.pre
    return Study(np.random.default_rng(0).random((pre.input_size, pre.input_size), dtype=np.float32))


@dataclass
class AnalysisResult:
    prediction: Any  # student Prediction
    comparison: Any | None  # Comparison when the teacher ran
    seconds: float


def analyse(classifier: Any, study: Study, compare: bool, token: Token = NO_TOKEN) -> AnalysisResult:
    """Student prediction (every slice for a CT volume), plus the teacher when ``compare``."""
    t0 = time.perf_counter()
    token.check()
    teacher = compare and classifier.has_teacher
    if teacher or _student_is_torch(classifier):
        configure_threads(classifier.threads)
    with ExitStack() as stack:
        if _student_is_torch(classifier):
            stack.enter_context(model_lock(classifier, "student"))
        if teacher:
            stack.enter_context(model_lock(classifier, "teacher"))
        if teacher:
            comp = classifier.compare(study)
            return AnalysisResult(comp.student, comp, time.perf_counter() - t0)
        pred = classifier.predict(study)
    return AnalysisResult(pred, None, time.perf_counter() - t0)


def export_dicom(
    classifier: Any, study: Study, result: AnalysisResult, out_dir: Path, case: Path | None,
    token: Token = NO_TOKEN,
) -> Any:
    """The shown result as a DICOM SR + SC (`kdviewer.dicom_out.export_case`), with the Grad-CAM of the
    answer on the capture — the same call ``kdviewer predict --dicom-out`` makes."""
    from kdviewer.dicom_out import export_case
    from kdviewer.errors import KDViewerError
    from kdviewer.inference.saliency import explain

    configure_threads(classifier.threads)
    token.check()
    try:
        with model_lock(classifier, "student"):
            smap = explain(classifier, study, result.prediction)
    except (ValueError, RuntimeError, KDViewerError):  # as the CLI: a capture without overlay
        smap = None
    token.check()
    return export_case(study, result.prediction, out_dir, bundle=classifier.bundle,
                       comparison=result.comparison, saliency=smap, case=case or study.source)


@dataclass
class SaliencyResult:
    frame: int
    method: str
    target: int | None
    maps: dict[str, Any] = field(default_factory=dict)  # role -> SaliencyMap
    agreement: float | None = None
    seconds: float = 0.0


def heatmap_of(smap: Any) -> np.ndarray:
    return np.asarray(getattr(smap, "heatmap", smap), dtype=np.float32)


def compute_saliency(
    classifier: Any,
    study: Study,
    method: str,
    target: int | None,
    roles: list[str],
    frame: int,
    token: Token = NO_TOKEN,
    cache: dict | None = None,
) -> SaliencyResult:
    """Saliency maps for the requested roles on one frame; reuses ``cache`` entries (keyed by the request)."""
    from kdviewer.inference import saliency as sal

    configure_threads(classifier.threads)
    t0 = time.perf_counter()
    out = SaliencyResult(frame, method, target)
    for role in roles:
        token.check()
        key = (role, frame, method, target)
        if cache is not None and key in cache:
            out.maps[role] = cache[key]
            continue
        with model_lock(classifier, role):
            token.check()
            smap = sal.saliency(classifier, study, method, target_class=target, role=role, frame=frame)
        out.maps[role] = smap
        if cache is not None:
            cache[key] = smap
    if "student" in out.maps and "teacher" in out.maps:
        try:
            out.agreement = float(sal.saliency_agreement(out.maps["student"], out.maps["teacher"]))
        except Exception:
            out.agreement = None
    out.seconds = time.perf_counter() - t0
    return out
