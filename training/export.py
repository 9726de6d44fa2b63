"""Write a model bundle (docs/CONTRACTS.md, ``kdviewer.models.manifest``) at the end of a run.

`export_bundle` is called by the engine with the trained student (and teacher) and the run's
loaders. In order, it:

1. writes ``student.pt`` / ``teacher.pt`` (CPU state dicts) and ``student.onnx`` (verified against
   torch), the file the viewer deploys;
2. evaluates the student (``student.onnx`` in ONNX Runtime: logits and features) and the teacher (torch,
   as the viewer runs it) on val (and test when given);
3. fits the calibration temperature on the student's *val* logits (ECE before/after) and computes
   metrics with bootstrap 95% CIs from temperature-scaled probabilities on the held-out split reported
   in the manifest (``metrics_split`` = "test" when a test loader is given, else "val"; temperature
   scaling changes neither arg-max labels nor binary/per-label AUCs);
4. fits the OOD guard on training-image features (``ood.npz``; threshold = 99th percentile of the
   val scores), sets the student/teacher disagreement threshold from val (95th percentile of the
   total-variation distance, clipped to [0.1, 0.5]; default 0.25 without a teacher);
5. writes ``student.int8.onnx`` (static QDQ quantization calibrated on TRAINING images sampled in the
   OOD pass, optionally with the first layers kept fp32; INT8 vs fp32 parity on a sample of val images
   kept by the prediction pass -> ``manifest.int8_parity``);
6. measures complexity (params, GFLOPs, activation memory, latency torch/ORT/INT8 for student and
   teacher);
7. writes ``manifest.json`` (validated), ``evaluation.json`` and ``history.json`` (everything the
   report plots), ``model_card.md`` and ``report.html``.

Everything is written into ``<out_dir>.tmp`` and renamed into place at the end, so a crash never
leaves a half-written bundle where the viewer would find it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdviewer.models.manifest import (
    Calibration,
    Manifest,
    ModelSpec,
    OodSpec,
    Preprocessing,
)
from training.placement import Placement

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
HISTORY_FILE = "history.json"
#: The export's substages, in order; ``progress`` is called with each name as it starts (the engine turns
#: them into ``progress`` events) and ``manifest.training.export_timings_s`` holds their seconds.
EXPORT_PHASES = (
    "onnx",  # weights + student.onnx (verified against torch)
    "predictions",  # student (student.onnx in ONNX Runtime, + features) and teacher (torch) on val/test
    "calibration",  # temperature scaling on val
    "bootstrap",  # metrics with bootstrap 95% CIs
    "ood",  # OOD statistics of training features (the same pass samples the INT8 calibration images)
    "int8",  # static INT8 quantization calibrated on training images
    "parity",  # INT8 vs fp32 on held-out images
    "latency",  # complexity: params, GFLOPs, latency torch / ORT / INT8
    "report",  # manifest, evaluation, model card, HTML report
)
#: Upper bound of the wall time spent on latency runs of all runtimes together (the export on a busy
#: machine must not grow without bound; the runs are round-robin, so ratios stay fair). 1.0 s gives every
#: runtime ~9 timed rounds in recipe 000 idle (a round: ResNet-50 teacher and ResNet-18 student in torch,
#: the student in ORT fp32 and INT8, ~110 ms), at least 5 (2 on a busy machine) whatever it takes; 2.5 s
#: made latency the largest part of an ~11 s export.
LATENCY_BUDGET_S = 1.0


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    try:
        from importlib.metadata import version

        kd = version("kdviewer")
    except Exception:  # not installed (running from a checkout)
        kd = "unknown"
    import torchvision

    return {
        "kdviewer": kd,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def redact_paths(value: Any) -> Any:
    """Absolute file-system paths in ``value`` (a JSON-like config) replaced by their last component
    and a fingerprint: a bundle travels, and ``/data/hospital/patients/DOE_JANE/...`` must not travel
    with it. The fingerprint still tells two runs on the same data apart."""
    import hashlib
    import os

    if isinstance(value, dict):
        return {k: redact_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_paths(v) for v in value]
    if isinstance(value, str) and len(value) > 1 and (os.path.isabs(value) or value.startswith("~")):
        digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
        return f"{Path(value).name} (path sha256:{digest})"
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _dropout_of(model: nn.Module) -> float:
    """The dropout rate of a head built by build_model(dropout > 0), else 0."""
    from kdviewer.models.architectures import get_module, spec_of

    try:
        head = get_module(model, spec_of(model).head)
    except (ValueError, AttributeError):
        return 0.0
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], nn.Dropout):
        return float(head[0].p)
    return 0.0


def _roc_curves(
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    task: str,
    positive: str | None,
    max_points: int = 200,
) -> dict[str, dict[str, list[float]]]:
    """ROC curve points per class (binary: the positive class only), thinned to ``max_points``."""
    from sklearn.metrics import roc_curve

    curves = {}
    if task == "multi-label":
        which = list(range(len(class_names)))
        truth = [targets[:, c] > 0.5 for c in which]
    elif len(class_names) == 2:
        which = [class_names.index(positive or class_names[-1])]
        truth = [targets == which[0]]
    else:
        which = list(range(len(class_names)))
        truth = [targets == c for c in which]
    for c, y in zip(which, truth, strict=False):
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        if len(fpr) > max_points:
            keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
            fpr, tpr = fpr[keep], tpr[keep]
        curves[class_names[c]] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    return curves


def _tv_distance(p: np.ndarray, q: np.ndarray, task: str) -> np.ndarray:
    if task == "multi-label":
        return np.abs(p - q).max(axis=1)
    return 0.5 * np.abs(p - q).sum(axis=1)


def _summarise_history(history: Sequence[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": len(history)}
    if history:
        out["last"] = _jsonable(history[-1])
        best = [h for h in history if h.get("best")]
        if best:
            out["best"] = _jsonable(best[-1])
    return out


def _card_info(m: Manifest) -> dict[str, Any]:
    """The run's ``output.card`` settings (data source, population, limitations), from the manifest."""
    config = m.training.get("config") if isinstance(m.training, dict) else None
    card = ((config or {}).get("output") or {}).get("card") if isinstance(config, dict) else None
    return card if isinstance(card, dict) else {}


def _model_card(m: Manifest, evaluation: dict[str, Any]) -> str:
    card = _card_info(m)
    lines: list[str] = []
    flags = []
    if m.demo:
        flags.append(
            "**DEMO MODEL — for demonstrating the software only; its outputs mean nothing clinically.**"
        )
    if m.synthetic_data:
        flags.append("**SYNTHETIC DATA — trained and evaluated on generated phantoms, not on patients.**")
    lines += flags + ([""] if flags else [])
    lines.append(f"# Model card: {m.name}")
    lines.append("")
    lines.append(
        f"Created {time.strftime('%Y-%m-%d %H:%M', time.localtime())} with kdviewer "
        f"{m.created_with.get('kdviewer', '?')}, torch {m.created_with.get('torch', '?')}."
    )
    lines += ["", "## Intended use", "", m.intended_use, ""]
    lines += [
        "Not for autonomous diagnosis. A trained reader makes every decision; the model offers a second "
        "look and says when a case looks unlike its training data.",
        "",
        "## Task and input",
        "",
        f"- Task: {m.task}; classes: {', '.join(m.class_names)}"
        + (f" (positive class: {m.positive_class})" if m.positive_class else ""),
        f"- Modality: {', '.join(m.modality)}",
        f"- Input: {m.preprocessing.channels} x {m.preprocessing.input_size} x {m.preprocessing.input_size}, "
        f"intensity '{m.preprocessing.intensity}', resize {m.preprocessing.resize}",
        f"- Student: {m.student.architecture} ({(m.student.params or 0) / 1e6:.2f} M params, "
        f"{m.student.gflops or 0:.3f} GFLOPs)",
    ]
    if m.teacher is not None:
        lines.append(
            f"- Teacher: {m.teacher.architecture} ({(m.teacher.params or 0) / 1e6:.2f} M params, "
            f"{m.teacher.gflops or 0:.3f} GFLOPs)"
        )
    if m.training.get("pruned_channels"):
        lines.append(
            "- The student is structurally pruned (channel counts in manifest training.pruned_channels)."
        )
    pre = m.preprocessing
    if pre.aspect == "squeeze" or (pre.aspect is None and pre.resize == pre.input_size):
        lines.append(
            f"- Geometry: every image is resized to {pre.input_size} x {pre.input_size} without keeping its "
            "aspect ratio (as the training images were stored)"
        )
    data = evaluation.get("data", {})
    lines += ["", "## Data", ""]
    if card.get("data_source"):
        lines.append(f"- Source: {card['data_source']}")
    if card.get("population"):
        lines.append(f"- Population: {card['population']}")
    lines.append(
        f"- Images: train {data.get('train', '?')}, val {data.get('val', '?')}, "
        f"test {data.get('test') or '-'}"
    )
    lines.append(f"- Data fingerprint: `{m.training.get('data_fingerprint', '')}`")
    if m.synthetic_data:
        lines.append("- The data are synthetic phantoms: the numbers below say nothing about real patients.")
    lines += ["", f"## Performance (student, {m.metrics_split} split, bootstrap 95% CI)", ""]
    lines += ["| metric | value | 95% CI |", "|---|---|---|"]
    for name, mv in m.metrics.items():
        ci = f"{mv.ci_low:.3f} – {mv.ci_high:.3f}" if mv.ci_low is not None and mv.ci_high is not None else ""
        lines.append(f"| {name} | {mv.value:.3f} | {ci} |")
    teacher_eval = evaluation.get("teacher", {}).get(m.metrics_split or "val")
    if teacher_eval:
        t = teacher_eval["metrics"]
        keys = [k for k in ("accuracy", "roc_auc", "f1") if k in t]
        lines.append("")
        lines.append(
            "Teacher on the same split: "
            + ", ".join(f"{k} {t[k]['value']:.3f}" for k in keys if t[k]["value"] is not None)
        )
    c = m.calibration
    cal = evaluation.get("calibration") or {}
    lines += ["", "## Calibration", ""]
    note = cal.get("note", "fitted on the val split")
    n = f" ({cal['n']} val cases)" if cal.get("n") is not None else ""
    lines.append(f"Temperature T = {c.temperature:.3f}: {note}{n}.")
    lines += ["", f"| | T = 1 (raw) | T = {c.temperature:.3f} (shipped) |", "|---|---|---|",
              f"| ECE (15 bins) | {_fmt(c.ece_before)} | {_fmt(c.ece_after)} |"]
    if cal.get("nll_before") is not None:
        lines.append(f"| NLL | {_fmt(cal['nll_before'])} | {_fmt(cal['nll_after'])} |")
    if c.temperature < 1:
        lines += ["", "T < 1 sharpens the probabilities (the raw model was under-confident on val)."]
    if m.int8_parity:
        p = m.int8_parity
        nan = float("nan")
        lines += ["", "## INT8 model", ""]
        through = m.training.get("int8_fp32_through")
        mixed = f", the first layers up to and including `{through}` kept in fp32" if through else ""
        lines.append(
            f"Static INT8 (QDQ, per-channel{mixed}) vs fp32 on {int(p.get('n', 0))} val images: label "
            f"agreement {p.get('agreement', nan):.4f}, max |Δp| {p.get('max_abs_diff_prob', nan):.4f}, "
            f"mean |Δp| {p.get('mean_abs_diff_prob', nan):.5f}; latency {p.get('latency_int8_ms', 0):.2f} "
            f"ms vs {p.get('latency_fp32_ms', 0):.2f} ms fp32 (batch 1). "
            + ("Recommended for deployment." if p.get("recommended") else "Kept, but fp32 is the default.")
        )
    if m.ood is not None:
        lines += ["", "## Out-of-distribution guard", ""]
        lines.append(
            f"Mahalanobis distance of penultimate features to the training distribution (Ledoit-Wolf "
            f"covariance); warning above {m.ood.threshold:.3g} (99th percentile of val scores: about 1% "
            "of in-distribution cases are flagged)."
        )
    lines += [
        "",
        "## Limitations",
        "",
        "- Performance was measured on data from the same source as the training data; expect it to drop on "
        "other hospitals, devices, populations and acquisition protocols (the OOD guard flags only "
        "gross shifts).",
        "- Confidence intervals cover resampling of the evaluation cases, not variation between "
        "training runs.",
        "- The model sees only the preprocessed image described above; it knows nothing of history, prior "
        "studies or other views.",
        "- Saliency maps show what influenced the score, not where disease is.",
    ]
    lines += [f"- {text}" for text in card.get("limitations") or []]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _count(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def export_bundle(
    out_dir: str | Path,
    *,
    name: str,
    task: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    student: nn.Module,
    student_arch: str,
    teacher: nn.Module | None,
    teacher_arch: str | None,
    train_loader: Iterable,
    val_loader: Iterable,
    test_loader: Iterable | None = None,
    config: dict,
    history: list[dict],
    data_fingerprint: str,
    demo: bool = False,
    synthetic: bool = False,
    device: str = "cpu",
    quantize: bool = True,
    int8_fp32_through: str | None = None,
    positive_class: str | None = None,
    modality: list[str] | None = None,
    n_boot: int = 1000,
    complexity: bool = True,
    latency_runs: int = 20,
    threads: int = 2,
    calibration_size: int = 64,
    parity_size: int = 128,
    ood_max_train: int = 5000,
    report: bool = True,
    extra_training: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the bundle for a trained student (and teacher) into ``out_dir``; returns ``out_dir``.

    See the module docstring for what is written. ``train_loader`` (un-augmented, any order) supplies
    the INT8 calibration images (a random sample of ``calibration_size``; MinMax ranges settle well
    before 64 images) and the OOD statistics
    (features of a random subset of batches, about ``ood_max_train`` images); ``val_loader`` the
    temperature, the OOD threshold and the INT8 parity set (a random sample of ``parity_size``); metrics go on
    the test split when ``test_loader`` is given, else on val. ``progress`` is called with the name of
    each phase as it starts (command-line progress). ``int8_fp32_through``: the INT8 model keeps the
    student's layers up to and including this module in fp32 (`training.quantize.fp32_nodes_through`;
    a module the student does not have raises ValueError and no bundle is written).
    """
    from training.calibration import calibrate, probabilities
    from training.evaluate import evaluate_model
    from training.metrics import compute_metrics, manifest_metrics

    t_start = time.time()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    class_names = [str(c) for c in class_names]
    if task == "single-label" and len(class_names) == 2 and positive_class is None:
        positive_class = class_names[-1]
    pre = preprocessing
    place = Placement(torch.device(device))  # model and inputs of every torch pass below
    student = place.model(student).eval()
    if teacher is not None:
        teacher = place.model(teacher).eval()
    timings: dict[str, float] = {}
    phase_start = [time.time(), ""]

    def _phase(name: str) -> None:
        if name and name == phase_start[1]:
            return  # already in it
        now = time.time()
        if phase_start[1]:
            timings[str(phase_start[1])] = round(now - float(phase_start[0]), 2)
        phase_start[0], phase_start[1] = now, name
        if progress is not None and name:
            progress(name)

    try:
        # 1. weights and ONNX: the student the viewer runs, also what the predictions below come from --

        _phase("onnx")
        from kdviewer.models.architectures import spec_of
        from kdviewer.models.onnx_export import export_onnx, ort_session
        from training.evaluate import evaluate_onnx

        cpu_student = Placement.cpu().model(student)
        cpu_teacher = Placement.cpu().model(teacher) if teacher is not None else None
        torch.save({k: v.detach().cpu() for k, v in cpu_student.state_dict().items()}, tmp / "student.pt")
        if cpu_teacher is not None:
            torch.save({k: v.detach().cpu() for k, v in cpu_teacher.state_dict().items()}, tmp / "teacher.pt")
        onnx_path = export_onnx(cpu_student, tmp / "student.onnx", pre.channels, pre.input_size)
        session = ort_session(onnx_path, threads)
        fp32_nodes: list[str] = []
        if quantize and int8_fp32_through:
            from training.quantize import fp32_nodes_through

            fp32_nodes = fp32_nodes_through(cpu_student, onnx_path, int8_fp32_through)

        # 2. predictions: the deployed student.onnx (verified against torch above) and the torch teacher,
        # as the viewer runs them; val keeps a random sample of its images for the INT8 parity check
        _phase("predictions")
        splits: dict[str, Iterable] = {"val": val_loader}
        if test_loader is not None:
            splits["test"] = test_loader
        s_out = {
            k: evaluate_onnx(session, ld, class_names, task, features=True,
                             sample=parity_size if quantize and k == "val" else 0)
            for k, ld in splits.items()
        }
        t_out = (
            {k: evaluate_model(teacher, ld, class_names, task, device, channels_last=True)
             for k, ld in splits.items()}
            if teacher is not None
            else {}
        )
        # 3. calibration on val -------------------------------------------------------------------
        _phase("calibration")
        cal = calibrate(s_out["val"]["logits"], s_out["val"]["targets"], task)
        temp = float(cal["temperature"])
        # 4. metrics with CIs ---------------------------------------------------------------------
        _phase("bootstrap")
        metrics_split = "test" if "test" in splits else "val"
        evaluation: dict[str, Any] = {"student": {}, "teacher": {}, "metrics_split": metrics_split}
        for split, res in s_out.items():
            probs = probabilities(res["logits"], task, temp)
            r = compute_metrics(res["targets"], probs, class_names, task, positive_class, n_boot=n_boot)
            r["roc_curves"] = _roc_curves(res["targets"], probs, class_names, task, positive_class)
            evaluation["student"][split] = r
        for split, res in t_out.items():
            r = compute_metrics(
                res["targets"], res["probs"], class_names, task, positive_class, n_boot=n_boot
            )
            r["roc_curves"] = _roc_curves(res["targets"], res["probs"], class_names, task, positive_class)
            evaluation["teacher"][split] = r
        evaluation["calibration"] = cal
        metrics = manifest_metrics(evaluation["student"][metrics_split])

        disagreement = 0.25
        if teacher is not None:
            tv = _tv_distance(probabilities(s_out["val"]["logits"], task, temp), t_out["val"]["probs"], task)
            disagreement = float(np.clip(np.percentile(tv, 95), 0.1, 0.5))
            evaluation["disagreement"] = {
                "tv_p50": float(np.median(tv)),
                "tv_p95": float(np.percentile(tv, 95)),
                "label_agreement": float(
                    np.mean((s_out["val"]["probs"] >= 0.5) == (t_out["val"]["probs"] >= 0.5))
                    if task == "multi-label"
                    else np.mean(s_out["val"]["logits"].argmax(1) == t_out["val"]["logits"].argmax(1))
                ),
                "threshold": disagreement,
            }

        # 5. OOD statistics of training features; the same pass samples the INT8 calibration images ----

        _phase("ood")
        from kdviewer.inference.ood import fit_ood_stats, ood_scores, save_ood_stats, threshold_from_scores

        n_train = _count(train_loader)
        keep = 1.0 if not n_train else min(1.0, 1.2 * ood_max_train / n_train)
        train_out = evaluate_onnx(
            session,
            train_loader,
            class_names,
            task,
            features=True,
            max_items=ood_max_train,
            keep_fraction=keep,
            sample=calibration_size if quantize else 0,
        )
        train_feats = train_out["features"]
        ood_spec = None
        if len(train_feats) >= 2:
            stats = fit_ood_stats(train_feats)
            save_ood_stats(tmp / "ood.npz", stats)
            val_scores = ood_scores(s_out["val"]["features"], stats)
            threshold = threshold_from_scores(val_scores, 99.0)
            ood_spec = OodSpec(method="mahalanobis", stats="ood.npz", threshold=threshold)
            evaluation["ood"] = {
                "threshold": threshold,
                "n_train": len(train_feats),
                "val_scores": {
                    "p50": float(np.median(val_scores)),
                    "p99": threshold,
                    "max": float(val_scores.max()),
                    "flagged_fraction": float(np.mean(val_scores > threshold)),
                },
                "train_scores_p99": float(np.percentile(ood_scores(train_feats, stats), 99)),
                "val_scores_sample": [round(float(v), 3) for v in val_scores[:2000]],
            }

        # 6. INT8 -----------------------------------------------------------------------------------

        int8_name: str | None = None
        int8_parity: dict[str, float] = {}
        training_notes: dict[str, Any] = {}
        _phase("int8")
        if quantize:
            from training.quantize import int8_parity as parity_fn
            from training.quantize import quantize_onnx

            try:
                quantize_onnx(onnx_path, tmp / "student.int8.onnx", train_out["sample_images"],
                              nodes_to_exclude=fp32_nodes)
                _phase("parity")
                held_out = s_out["val"]["sample_images"]
                # latency of both files: measured once, with the complexity table when there is one
                int8_parity = parity_fn(
                    session, tmp / "student.int8.onnx", held_out, task, temp, threads=threads,
                    runs=0 if complexity else latency_runs,
                    fp32_logits=s_out["val"]["logits"][s_out["val"]["sample_index"]],
                )
                int8_name = "student.int8.onnx"
                if int8_fp32_through:
                    training_notes["int8_fp32_through"] = int8_fp32_through
            except Exception as exc:  # INT8 is optional: record why it is missing
                log.warning("INT8 quantization failed: %s", exc)
                training_notes["int8_error"] = f"{type(exc).__name__}: {exc}"
                (tmp / "student.int8.onnx").unlink(missing_ok=True)
        _phase("parity")  # (no-op when it ran above, or without INT8)

        # 7. complexity ---------------------------------------------------------------------------

        _phase("latency")
        from training.complexity import compare_student_teacher, static_complexity
        from training.quantize import recommend_int8

        s_static = static_complexity(cpu_student, pre.input_size, pre.channels)
        t_static = (
            static_complexity(cpu_teacher, pre.input_size, pre.channels) if cpu_teacher is not None else None
        )
        if complexity:
            try:
                evaluation["complexity"] = compare_student_teacher(
                    cpu_student,
                    cpu_teacher,
                    input_size=pre.input_size,
                    channels=pre.channels,
                    student_onnx=onnx_path,
                    student_int8=tmp / int8_name if int8_name else None,
                    # the teacher runs in torch in the viewer: timed there, never exported or quantized
                    # here (an ONNX export + INT8 calibration of a ResNet-50 only for a table cell)
                    calibration=None,
                    export_missing=False,
                    static={"student": s_static, **({"teacher": t_static} if t_static else {})},
                    threads=threads,
                    runs=latency_runs,
                    warmup=2,
                    budget_s=LATENCY_BUDGET_S,
                    adapt_to_load=True,
                )
            except Exception as exc:
                log.warning("complexity measurement failed: %s", exc)
                training_notes["complexity_error"] = f"{type(exc).__name__}: {exc}"
        if "complexity" not in evaluation:
            evaluation["complexity"] = {"student": s_static, **({"teacher": t_static} if t_static else {})}
        if int8_parity and "latency_int8_ms" not in int8_parity:
            lat = (evaluation["complexity"].get("student") or {}).get("latency_ms") or {}
            if "ort_fp32" in lat and "ort_int8" in lat:
                int8_parity.update(latency_fp32_ms=lat["ort_fp32"], latency_int8_ms=lat["ort_int8"])
            else:  # the complexity table failed: time the two files here
                from training.quantize import int8_latency

                int8_parity.update(
                    int8_latency(onnx_path, tmp / "student.int8.onnx", held_out[:1], threads, latency_runs)
                )
            int8_parity = recommend_int8(int8_parity)
        evaluation["int8_parity"] = int8_parity

        # 8. manifest and human-readable files ----------------------------------------------------

        _phase("report")
        s_spec = spec_of(cpu_student)
        student_spec = ModelSpec(
            architecture=student_arch,
            weights="student.pt",
            onnx="student.onnx",
            onnx_int8=int8_name,
            target_layer=s_spec.target_layer,
            feature_layer=s_spec.head,
            params=int(s_static["params"]),
            gflops=float(s_static["gflops"]),
        )
        teacher_spec = None
        if teacher is not None and t_static is not None:
            t_spec = spec_of(teacher)
            teacher_spec = ModelSpec(
                architecture=teacher_arch or t_spec.name,
                weights="teacher.pt",
                target_layer=t_spec.target_layer,
                feature_layer=t_spec.head,
                params=int(t_static["params"]),
                gflops=float(t_static["gflops"]),
            )
        data_counts = {
            "train": _count(train_loader),
            "val": len(s_out["val"]["targets"]),
            "test": len(s_out["test"]["targets"]) if "test" in s_out else None,
        }
        evaluation["data"] = data_counts
        training: dict[str, Any] = {
            "config": redact_paths(_jsonable(config)),
            "data_fingerprint": data_fingerprint,
            "data": data_counts,
            "history": _summarise_history(history),
            "student_dropout": _dropout_of(cpu_student),
            "teacher_dropout": _dropout_of(teacher) if teacher is not None else None,
            "feature_layer_note": "feature_layer names the classifier head; the features are its input",
            "export_seconds": None,
        }
        pruned = getattr(cpu_student, "pruned_channels", None)
        if pruned:
            training["pruned_channels"] = dict(pruned)
        if teacher is not None and metrics_split in evaluation["teacher"]:
            training["teacher_metrics"] = manifest_metrics(evaluation["teacher"][metrics_split])
        cx = evaluation.get("complexity", {})
        if "ratios" in cx:
            training["complexity_ratios"] = cx["ratios"]
        training.update(training_notes)
        training.update(extra_training or {})
        _phase("")
        training["export_seconds"] = round(time.time() - t_start, 1)
        training["export_timings_s"] = dict(timings)
        intended_use = ((config or {}).get("output") or {}).get("card", {}).get("intended_use")
        manifest = Manifest(
            name=name,
            task=task,  # type: ignore[arg-type]
            class_names=class_names,
            positive_class=positive_class,
            modality=modality or ["CR", "DX"],
            preprocessing=pre,
            student=student_spec,
            teacher=teacher_spec,
            calibration=Calibration(
                temperature=temp, ece_before=cal["ece_before"], ece_after=cal["ece_after"]
            ),
            disagreement_threshold=disagreement,
            ood=ood_spec,
            metrics=metrics,  # type: ignore[arg-type]
            metrics_split=metrics_split,
            training=_jsonable(training),
            created_with=_versions(),
            demo=demo,
            synthetic_data=synthetic,
            int8_parity=int8_parity,
            **({"intended_use": intended_use} if intended_use else {}),
        )
        manifest = Manifest.model_validate_json(manifest.model_dump_json())  # round-trip check
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (tmp / EVALUATION_FILE).write_text(
            json.dumps(_jsonable(evaluation), indent=1) + "\n", encoding="utf-8"
        )
        (tmp / HISTORY_FILE).write_text(
            json.dumps(_jsonable(list(history)), indent=1) + "\n", encoding="utf-8"
        )
        (tmp / "model_card.md").write_text(_model_card(manifest, evaluation), encoding="utf-8")
        if report:
            from training.report import write_report

            try:
                write_report(tmp, out=tmp / "report.html")
            except Exception as exc:  # a report failure must not lose the bundle
                log.warning("report generation failed: %s", exc)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        place.model(student)
    log.info("bundle written to %s in %.1f s", out_dir, time.time() - t_start)
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` folder as atomically as folders allow."""
    if dst.exists():
        old = dst.with_name(dst.name + f".old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_minimal_bundle(bundle: Any, student: nn.Module, out_dir: str | Path, *, pruning: dict) -> Path:
    """A copy of ``bundle`` with a new (e.g. pruned) student but no data to re-evaluate it with.

    Weights and ONNX are replaced and re-verified; metrics, calibration, the OOD guard and INT8 are
    dropped because they described the old weights; ``training["pruning"]`` records what happened.
    """
    from kdviewer.models.architectures import spec_of
    from kdviewer.models.onnx_export import export_onnx
    from training.complexity import count_flops, count_params

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        m = bundle.manifest
        pre = m.preprocessing
        student = student.to("cpu").eval()
        torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, tmp / "student.pt")
        export_onnx(student, tmp / "student.onnx", pre.channels, pre.input_size)
        if m.teacher is not None and m.teacher.weights:
            shutil.copy2(bundle.path(m.teacher.weights), tmp / "teacher.pt")
        training = dict(m.training)
        training["pruning"] = _jsonable(pruning) | {
            "note": "not re-evaluated: metrics, calibration, OOD statistics and INT8 were removed"
        }
        if getattr(student, "pruned_channels", None):
            training["pruned_channels"] = dict(student.pruned_channels)  # type: ignore[arg-type]
        data = m.model_dump()
        data.update(
            name=f"{m.name}-pruned",
            student=ModelSpec(
                architecture=m.student.architecture,
                weights="student.pt",
                onnx="student.onnx",
                target_layer=spec_of(student).target_layer,
                feature_layer=spec_of(student).head,
                params=count_params(student),
                gflops=count_flops(student, pre.input_size, pre.channels) / 1e9,
            ).model_dump(),
            metrics={},
            metrics_split=None,
            calibration=Calibration().model_dump(),
            ood=None,
            int8_parity={},
            training=_jsonable(training),
            created_with=_versions(),
        )
        if m.teacher is not None and not m.teacher.weights:
            data["teacher"] = None
        manifest = Manifest.model_validate(data)
        (tmp / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (tmp / "model_card.md").write_text(_model_card(manifest, {}), encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
