"""The results report: one self-contained HTML file (PNG plots embedded as base64, matplotlib Agg).

`write_report(path)` accepts a bundle folder (``manifest.json`` + ``evaluation.json`` +
``history.json``, as written by `training.export.export_bundle`) or a run folder that contains one
(the bundle is found as ``bundle/``, ``<name>/`` or any sub-folder holding a manifest). It writes:

* a SYNTHETIC / DEMO banner when the bundle is so flagged;
* data summary (split sizes, classes, fingerprint, preprocessing);
* training curves (``history.json`` of the bundle, else ``epoch_end`` events of ``*.jsonl`` files
  in the run folder);
* metrics with bootstrap 95% CIs for student and teacher on every evaluated split;
* confusion-matrix and ROC plots;
* the complexity table (params, GFLOPs, activation memory, latency torch vs ORT vs INT8 for
  student and teacher, and the student/teacher ratios) and the INT8 parity check;
* calibration (reliability diagram, ECE before/after the temperature);
* the ablation table when ``ablation.json`` (a list of ``{"name": ..., "metrics": {...}, ...}``)
  is in the run or bundle folder;
* an OOD section: the guard's threshold and in-distribution (val) scores, plus results of running
  the student on other datasets (`ood_results`, or ``ood_results.json`` in the run / bundle folder).

``kd-train report RUN_DIR [--out FILE] [--ood-data DIR ...]`` is the command-line entry.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdviewer.inference.ood import DomainShift, domain_shift

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------ inputs


def find_bundle(path: str | Path) -> Path:
    """The bundle folder of a run folder (or the folder itself when it is a bundle)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if path.is_file() and path.name == MANIFEST:
        return path.parent
    for name in ("bundle", "model", "export"):
        if (path / name / MANIFEST).is_file():
            return path / name
    candidates = sorted(p.parent for p in path.glob("*/" + MANIFEST))
    candidates = [c for c in candidates if not c.name.endswith((".tmp",)) and ".old-" not in c.name]
    if not candidates:
        raise FileNotFoundError(f"{path}: no model bundle (manifest.json) in this folder or its sub-folders")
    return max(candidates, key=lambda p: (p / MANIFEST).stat().st_mtime)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


def _history(bundle: Path, run_dir: Path) -> list[dict]:
    """Epoch records: the bundle's history.json, else epoch_end events of the run's .jsonl logs."""
    hist = _read_json(bundle / "history.json") if (bundle / "history.json").is_file() else None
    if hist:
        return list(hist)
    from kdviewer.events import parse_event

    records: list[dict] = []
    for folder in dict.fromkeys([run_dir, bundle]):
        for f in sorted(folder.glob("*.jsonl")):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    ev = parse_event(line)
                    if ev and ev.get("event") == "epoch_end":
                        records.append(ev)
        if records:
            break
    return records


def _flat_history(history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {series name: [(epoch, value)]}} from nested ({"train": {...}}) or flat records."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for i, rec in enumerate(history):
        stage = str(rec.get("stage", "train"))
        epoch = int(rec.get("epoch", i + 1))
        series = out.setdefault(stage, {})
        for key, value in rec.items():
            if isinstance(value, dict) and key in ("train", "val", "test"):
                for k, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        series.setdefault(f"{key} {k}", []).append((epoch, float(v)))
                    elif isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
                        series.setdefault(f"{key} {k}", []).append((epoch, float(v["value"])))
            elif (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key not in ("epoch", "time", "epoch_time_s", "step", "schema")
                and math.isfinite(value)
            ):
                series.setdefault(key.replace("_", " "), []).append((epoch, float(value)))
    return out


# ------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def _plot_curves(flat: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    plt = _plt()
    stages = [s for s, series in flat.items() if series]
    if not stages:
        return ""
    fig, axes = plt.subplots(len(stages), 2, figsize=(10, 3.2 * len(stages)), squeeze=False)
    for row, stage in enumerate(stages):
        series = flat[stage]
        ax_loss, ax_metric = axes[row]
        for name, pts in sorted(series.items()):
            xs, ys = zip(*pts, strict=False)
            low = name.lower()
            if "loss" in low:
                ax_loss.plot(xs, ys, marker=".", label=name)
            elif any(k in low for k in ("acc", "auc", "f1", "precision", "recall", "specificity")):
                ax_metric.plot(xs, ys, marker=".", label=name)
        ax_loss.set_title(f"{stage}: loss")
        ax_metric.set_title(f"{stage}: validation metrics")
        for ax in (ax_loss, ax_metric):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _plot_confusion(result: dict, title: str) -> str:
    plt = _plt()
    cm = np.asarray(result["confusion_matrix"])
    names = result["class_names"]
    if cm.ndim == 3:  # multi-label: one 2x2 per label
        k = cm.shape[0]
        fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.6), squeeze=False)
        for i in range(k):
            _heat(axes[0, i], cm[i], ["neg", "pos"], names[i] if i < len(names) else f"label {i}")
    else:
        size = max(3.5, 0.8 * len(names) + 2)
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        _heat(ax, cm, names, title)
    fig.tight_layout()
    return _png(fig)


def _heat(ax: Any, cm: np.ndarray, names: Sequence[str], title: str) -> None:
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    vmax = cm.max() if cm.size else 1
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if v > vmax / 2 else "black")


def _plot_roc(curves: dict[str, tuple[str, dict]]) -> str:
    """curves: label -> (linestyle, {"fpr": [...], "tpr": [...]})."""
    if not curves:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, (style, c) in curves.items():
        ax.plot(c["fpr"], c["tpr"], style, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_reliability(cal: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for key, label, style in (
        ("reliability_before", f"before (ECE {cal.get('ece_before', float('nan')):.3f})", "o--"),
        (
            "reliability_after",
            f"after T={cal.get('temperature', 1):.2f} (ECE {cal.get('ece_after', float('nan')):.3f})",
            "s-",
        ),
    ):
        b = cal.get(key)
        if not b:
            continue
        conf = np.asarray([np.nan if v is None else v for v in b["confidence"]], dtype=float)
        acc = np.asarray([np.nan if v is None else v for v in b["accuracy"]], dtype=float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[ok], acc[ok], style, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (val)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_ood(ood: dict, results: list[dict]) -> str:
    val = ood.get("val_scores_sample")
    if not val and not results:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    all_scores = list(val or []) + [s for r in results for s in r.get("scores", [])]
    if not all_scores:
        plt.close(fig)
        return ""
    bins = np.linspace(0, max(all_scores) * 1.05 + 1e-6, 40)
    if val:
        ax.hist(val, bins=bins, alpha=0.6, density=True, label="val (in-distribution)")
    for r in results:
        if r.get("scores"):
            ax.hist(r["scores"], bins=bins, alpha=0.5, density=True, label=str(r.get("name", "other")))
    ax.axvline(ood["threshold"], color="red", linestyle="--", label="threshold")
    ax.set_xlabel("Mahalanobis distance (higher = less like the training data)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}f}"
    return _e(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(m: dict | None) -> str:
    if not m or m.get("ci_low") is None or m.get("ci_high") is None:
        return "–"
    return f"{m['ci_low']:.3f} – {m['ci_high']:.3f}"


def _metric_cell(m: Any) -> str:
    if isinstance(m, dict) and "value" in m:
        v = m.get("value")
        ci = _ci(m)
        return _num(v) + ("" if ci == "–" else f" <small>[{ci}]</small>")
    return _num(m)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em} h1{font-size:1.6em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left} th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa} small{color:#666}
.banner{padding:.8em 1em;margin:.5em 0;font-weight:bold;font-size:1.2em;border-radius:4px}
.synthetic{background:#fff3cd;border:2px solid #d39e00} .demo{background:#f8d7da;border:2px solid #c82333}
.note{color:#555;font-size:.9em} img{max-width:100%} code{background:#f3f3f3;padding:0 .2em}
"""


def write_report(
    run_dir_or_bundle: str | Path,
    out: str | Path | None = None,
    *,
    ood_results: list[dict] | None = None,
    ablation: list[dict] | None = None,
    title: str | None = None,
) -> Path:
    """Write the HTML report; returns its path (default ``<bundle>/report.html``)."""
    src = Path(run_dir_or_bundle)
    bundle = find_bundle(src)
    run_dir = src if src.is_dir() else src.parent
    manifest = _read_json(bundle / MANIFEST) or {}
    evaluation = _read_json(bundle / "evaluation.json") or {}
    history = _history(bundle, run_dir)
    if ablation is None:
        for folder in dict.fromkeys([run_dir, bundle]):
            if (folder / "ablation.json").is_file():
                ablation = _read_json(folder / "ablation.json")
                break
    if ood_results is None:
        for folder in dict.fromkeys([run_dir, bundle]):
            if (folder / "ood_results.json").is_file():
                ood_results = _read_json(folder / "ood_results.json")
                break
    out = Path(out) if out is not None else bundle / "report.html"

    name = manifest.get("name", bundle.name)
    shown = bundle.with_name(bundle.name.removesuffix(".tmp"))  # export writes the report before renaming
    parts: list[str] = []
    parts.append(f"<h1>{_e(title or f'Results report: {name}')}</h1>")
    if manifest.get("synthetic_data"):
        parts.append(
            '<div class="banner synthetic">SYNTHETIC DATA — trained and evaluated on generated phantoms; '
            "these numbers say nothing about real patients.</div>"
        )
    if manifest.get("demo"):
        parts.append('<div class="banner demo">DEMO MODEL — for demonstrating the software only.</div>')
    parts.append(
        f'<p class="note">Generated {time.strftime("%Y-%m-%d %H:%M")} from <code>{_e(shown)}</code>. '
        f"{_e(manifest.get('intended_use', ''))}</p>"
    )

    parts += _section_data(manifest, evaluation)
    parts += _section_curves(history)
    parts += _section_metrics(manifest, evaluation)
    parts += _section_complexity(evaluation, manifest)
    parts += _section_calibration(evaluation, manifest)
    parts += _section_ablation(ablation)
    parts += _section_ood(evaluation, ood_results or [])

    doc = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(name)} — report</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return out


def _section_data(manifest: dict, evaluation: dict) -> list[str]:
    pre = manifest.get("preprocessing", {})
    training = manifest.get("training", {})
    data = evaluation.get("data") or training.get("data") or {}
    rows = [
        ("task", _e(manifest.get("task", "?"))),
        ("classes", _e(", ".join(manifest.get("class_names", [])))),
        ("positive class", _e(manifest.get("positive_class") or "–")),
        ("images (train / val / test)", " / ".join(_num(data.get(k)) for k in ("train", "val", "test"))),
        ("data fingerprint", f"<code>{_e(training.get('data_fingerprint', ''))}</code>"),
        (
            "input",
            _e(
                f"{pre.get('channels', '?')} x {pre.get('input_size', '?')} x {pre.get('input_size', '?')}, "
                f"resize {pre.get('resize', '?')}, intensity {pre.get('intensity', '?')}"
            ),
        ),
        ("student", _e(manifest.get("student", {}).get("architecture", "?"))),
        ("teacher", _e((manifest.get("teacher") or {}).get("architecture", "–"))),
    ]
    for split, res in (evaluation.get("student") or {}).items():
        support = res.get("support")
        if support:
            pairs = zip(res.get("class_names", []), support, strict=False)
            rows.append((f"{split} class support", _e(", ".join(f"{c}: {n}" for c, n in pairs))))
    if training.get("pruned_channels"):
        rows.append(
            (
                "pruning",
                _e(
                    json.dumps(
                        training.get("config", {}).get("pruning")
                        or training.get("pruning")
                        or "structurally pruned student"
                    )
                ),
            )
        )
    return ["<h2>Data</h2>", _table(["", ""], rows)]


def _section_curves(history: list[dict]) -> list[str]:
    flat = _flat_history(history)
    img = _plot_curves(flat) if flat else ""
    if not img:
        return ["<h2>Training curves</h2>", "<p class='note'>No training history was recorded.</p>"]
    return ["<h2>Training curves</h2>", img]


_MAIN = ("accuracy", "roc_auc", "precision", "recall", "f1", "specificity")


def _section_metrics(manifest: dict, evaluation: dict) -> list[str]:
    parts = ["<h2>Metrics (bootstrap 95% CI)</h2>"]
    split_used = evaluation.get("metrics_split") or manifest.get("metrics_split")
    parts.append(
        f"<p class='note'>The manifest reports the student on the <b>{_e(split_used)}</b> split. "
        "Probabilities are temperature-scaled (this changes neither labels nor binary AUC). "
        "CIs: percentile bootstrap over cases.</p>"
    )
    results: list[tuple[str, str, dict]] = []
    for role in ("student", "teacher"):
        for split, res in (evaluation.get(role) or {}).items():
            results.append((role, split, res))
    if not results and manifest.get("metrics"):
        results.append(("student", str(split_used), {"metrics": manifest["metrics"]}))
    if not results:
        return [*parts, "<p>No metrics were recorded.</p>"]
    names: list[str] = [n for n in _MAIN if any(n in r["metrics"] for _, _, r in results)]
    extra = sorted({n for _, _, r in results for n in r["metrics"] if n not in names})
    names += extra
    headers = ["model", "split", "n", *names]
    rows = []
    for role, split, res in results:
        rows.append(
            [_e(role), _e(split), _num(res.get("n"))] + [_metric_cell(res["metrics"].get(n)) for n in names]
        )
    parts.append(_table(headers, rows))

    # Confusion matrices and ROC of the reported split.
    imgs = []
    for role in ("student", "teacher"):
        res = (evaluation.get(role) or {}).get(split_used)
        if res and res.get("confusion_matrix"):
            imgs.append(_plot_confusion(res, f"{role}, {split_used}"))
    if imgs:
        parts.append("<h3>Confusion matrix</h3>" + "".join(imgs))
    curves: dict[str, tuple[str, dict]] = {}
    for role, style in (("student", "-"), ("teacher", "--")):
        res = (evaluation.get(role) or {}).get(split_used) or {}
        for cls, c in (res.get("roc_curves") or {}).items():
            auc = res.get("metrics", {}).get(f"roc_auc:{cls}") or res.get("metrics", {}).get("roc_auc")
            label = f"{role} {cls}" + (
                f" (AUC {auc['value']:.3f})" if auc and auc.get("value") is not None else ""
            )
            curves[label] = (style, c)
    roc = _plot_roc(curves)
    if roc:
        parts.append("<h3>ROC curves</h3>" + roc)
    return parts


def _section_complexity(evaluation: dict, manifest: dict) -> list[str]:
    cx = evaluation.get("complexity") or {}
    parts = ["<h2>Complexity</h2>"]
    rows = []
    for role in ("student", "teacher"):
        r = cx.get(role)
        if not r:
            spec = manifest.get(role) or {}
            if spec.get("params"):
                rows.append(
                    [_e(role), _num(spec["params"] / 1e6, 2), _num(spec.get("gflops"), 3)] + ["–"] * 5
                )
            continue
        lat = r.get("latency_ms", {})
        rows.append(
            [
                _e(role),
                _num(r.get("params", 0) / 1e6, 2),
                _num(r.get("gflops"), 3),
                _num(r.get("activation_mb"), 1),
                _num(r.get("state_dict_mb"), 1),
                _num(lat.get("torch_fp32"), 2),
                _num(lat.get("ort_fp32"), 2),
                _num(lat.get("ort_int8"), 2),
            ]
        )
    if not rows:
        return [*parts, "<p>No complexity measurements were recorded.</p>"]
    parts.append(
        _table(
            [
                "model",
                "params (M)",
                "GFLOPs",
                "activations (MiB)",
                "weights (MiB)",
                "torch fp32 (ms)",
                "ORT fp32 (ms)",
                "ORT INT8 (ms)",
            ],
            rows,
        )
    )
    ratios = cx.get("ratios") or {}
    if ratios:
        parts.append(
            _table(["ratio", "value"], [[_e(k.replace("_", " ")), _num(v, 3)] for k, v in ratios.items()])
        )
    s = cx.get("settings") or {}
    if s:
        parts.append(
            f"<p class='note'>Batch 1, input {s.get('channels')}x{s.get('input_size')}x"
            f"{s.get('input_size')}, {s.get('threads')} threads, median of up to {s.get('runs')} runs"
            + (f" (timed for at most {s['latency_budget_s']} s)" if s.get("latency_budget_s") else "")
            + f" after {s.get('warmup')} warm-up runs, "
            "all runtimes timed round-robin in one process. GFLOPs count a multiply-add as 2 FLOPs. "
            "Latencies on a shared machine are noisy; compare ratios."
            + (f" <b>Measured on a busy machine</b> (other processes used {s.get('other_cpu_cores')} cores):"
               " 1 thread, fewer runs." if s.get("busy_machine") else "")
            + "</p>"
        )
    parity = evaluation.get("int8_parity") or manifest.get("int8_parity") or {}
    if parity:
        parts.append("<h3>INT8 parity (val images)</h3>")
        parts.append(_table(["check", "value"], [[_e(k), _num(v, 4)] for k, v in parity.items()]))
    return parts


def _section_calibration(evaluation: dict, manifest: dict) -> list[str]:
    cal = evaluation.get("calibration") or {}
    mc = manifest.get("calibration") or {}
    if not cal and not mc:
        return []
    parts = ["<h2>Calibration</h2>"]
    rows = [
        ["temperature (fitted on val)", _num(cal.get("temperature", mc.get("temperature")), 3)],
        ["ECE before (15 bins)", _num(cal.get("ece_before", mc.get("ece_before")), 4)],
        ["ECE after", _num(cal.get("ece_after", mc.get("ece_after")), 4)],
        ["NLL before", _num(cal.get("nll_before"), 4)],
        ["NLL after", _num(cal.get("nll_after"), 4)],
    ]
    parts.append(_table(["", ""], rows))
    if cal.get("reliability_before"):
        parts.append(_plot_reliability(cal))
    return parts


def _section_ablation(ablation: list[dict] | None) -> list[str]:
    if not ablation:
        return []
    entries = ablation if isinstance(ablation, list) else ablation.get("runs", [])
    metric_names: list[str] = []
    other: list[str] = []
    for e in entries:
        for k in e.get("metrics") or {}:
            if k not in metric_names:
                metric_names.append(k)
        for k, v in e.items():
            if k in ("name", "metrics") or k in other:
                continue
            if isinstance(v, dict) and "value" in v:
                if k not in metric_names:
                    metric_names.append(k)
            elif isinstance(v, (int, float, str, bool)):
                other.append(k)
    ordered = [n for n in _MAIN if n in metric_names] + [n for n in metric_names if n not in _MAIN]
    rows = []
    for e in entries:
        m = dict(e.get("metrics") or {})
        m.update({k: v for k, v in e.items() if isinstance(v, dict) and "value" in v})
        rows.append(
            [_e(e.get("name", "?"))]
            + [_metric_cell(m.get(n)) for n in ordered]
            + [_num(e.get(k)) for k in other]
        )
    return [
        "<h2>Ablation</h2>",
        "<p class='note'>Same student, data and seed; only the distillation method changes. "
        "Values with bootstrap 95% CIs where recorded.</p>",
        _table(["run", *ordered, *other], rows),
    ]


def _section_ood(evaluation: dict, results: list[dict]) -> list[str]:
    ood = evaluation.get("ood")
    if not ood and not results:
        return []
    parts = ["<h2>Out-of-distribution guard</h2>"]
    if ood:
        v = ood.get("val_scores", {})
        parts.append(
            f"<p>Mahalanobis distance of the student's penultimate features to the training distribution "
            f"({_num(ood.get('n_train'))} training images, Ledoit-Wolf covariance). Warning threshold "
            f"<b>{_num(ood.get('threshold'))}</b> = 99th percentile of val scores "
            f"(val median {_num(v.get('p50'))}, "
            f"flagged {_num(100 * v.get('flagged_fraction', 0), 1)}%).</p>"
        )
    if results:
        rows = []
        for r in results:
            rows.append(
                [
                    _e(r.get("name", "?")),
                    _num(r.get("n")),
                    _num(r.get("median_score")),
                    _num(100 * r.get("flagged_fraction", float("nan")), 1) + "%",
                    "–" if r.get("shift_p_value") is None else f"{r['shift_p_value']:.1e}",
                    _e(r.get("expected", "")),
                    _e(r.get("verdict", "")),
                ]
            )
        parts.append(
            _table(
                ["dataset", "images", "median score", "flagged", "dataset shift p", "expected", "verdict"],
                rows,
            )
        )
    img = _plot_ood(ood or {"threshold": 0}, results) if ood else ""
    if img:
        parts.append(img)
    return parts


# ------------------------------------------------------------------------------------ OOD results


def ood_verdict(n_flagged: int, n: int, expect_ood: bool) -> tuple[DomainShift, str]:
    """Does the guard say what it should about a set of ``n`` images of which ``n_flagged`` were flagged?

    Per image first (out-of-distribution set: >= 80% flagged; in-distribution: <= 5%), then, for an
    out-of-distribution set that is not flagged image by image, at the set level (`DomainShift`).
    """
    shift = domain_shift(n_flagged, n)
    flagged = n_flagged / n if n else float("nan")
    if not expect_ood:
        ok = flagged <= 0.05
        verdict = "as expected: few images flagged" if ok else "NOT as expected: too many flagged"
    elif flagged >= 0.8:
        verdict = "as expected: most images flagged"
    elif shift.shifted:
        verdict = (
            f"partly: set-level domain shift detected (p={shift.p_value:.1e}), "
            f"only {flagged:.0%} flagged one by one"
        )
    else:
        verdict = "NOT as expected: the guard does not see these images as different"
    return shift, verdict


def ood_results(
    bundle: str | Path,
    data: str | Path,
    *,
    name: str | None = None,
    expect_ood: bool = True,
    limit: int | None = 500,
    threads: int = 2,
) -> dict[str, Any]:
    """Run a bundle's student on every image under ``data`` and score it with the OOD guard.

    Returns {"name", "n", "scores", "median_score", "flagged_fraction", "threshold", "shift_p_value",
    "expected", "verdict", "predicted"} for the report. ``expect_ood`` states what the guard *should*
    say (True for a different population / task, e.g. adult CXRs for a paediatric model). The verdict
    is per image first (>= 80% flagged; in-distribution: <= 5%) and, for an out-of-distribution set
    that is not flagged image by image, at the dataset level: ``shift_p_value`` is the binomial
    probability of at least this many flags if every image were in-distribution (flag rate 1%).
    """
    from kdviewer.errors import ImageError
    from kdviewer.imaging import is_supported_file, load
    from kdviewer.inference.ood import load_ood_stats, ood_scores
    from kdviewer.models.bundle import open_bundle
    from kdviewer.models.onnx_export import ort_session
    from kdviewer.models.preprocess import preprocess_study
    from training.quantize import run_onnx

    data = Path(data)
    files = [p for p in sorted(data.rglob("*")) if is_supported_file(p)] if data.is_dir() else [data]
    if limit is not None:
        files = files[:limit]
    with open_bundle(bundle) as b:
        m = b.manifest
        if m.ood is None or not m.ood.stats:
            raise ValueError(f"{bundle}: this bundle has no OOD statistics")
        stats = load_ood_stats(b.path(m.ood.stats))
        images = []
        for f in files:
            try:
                images.append(preprocess_study(load(f), m.preprocessing)[0])
            except (ImageError, OSError, ValueError) as exc:
                log.warning("skipping %s: %s", f, exc)
        if not images:
            raise ValueError(f"{data}: no readable images")
        logits, feats = run_onnx(ort_session(b.onnx_path(), threads), np.stack(images))
        scores = ood_scores(feats, stats)
        threshold = float(m.ood.threshold)
        labels = [m.class_names[i] for i in logits.argmax(1)] if m.task == "single-label" else []
    n_flagged = int(np.sum(scores > threshold))
    flagged = n_flagged / len(scores)
    shift, verdict = ood_verdict(n_flagged, len(scores), expect_ood)
    return {
        "name": name or data.name,
        "n": len(scores),
        "scores": [round(float(s), 3) for s in scores],
        "median_score": float(np.median(scores)),
        "flagged_fraction": flagged,
        "threshold": threshold,
        "expected": "flagged (out of distribution)" if expect_ood else "not flagged (in distribution)",
        "shift_p_value": shift.p_value,
        "verdict": verdict,
        "predicted": {c: labels.count(c) for c in dict.fromkeys(labels)},
    }


# --------------------------------------------------------------------------------------------- CLI


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``kd-train report RUN_DIR [--out FILE] [--ood-data DIR ...] [--in-dist-data DIR ...]``."""
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML results report for a run folder or bundle",
        description="Write report.html (curves, metrics with CIs, ROC, confusion matrix, complexity, "
        "calibration, ablation, OOD) for a run folder or a model bundle.",
    )
    p.add_argument("run_dir", help="run folder (containing a bundle) or bundle folder")
    p.add_argument("--out", default=None, help="output HTML file (default: <bundle>/report.html)")
    p.add_argument(
        "--ood-data",
        action="append",
        default=[],
        metavar="DIR",
        help="images from another population the OOD guard should flag (repeatable)",
    )
    p.add_argument(
        "--in-dist-data",
        action="append",
        default=[],
        metavar="DIR",
        help="images like the training data the guard should NOT flag (repeatable)",
    )
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    results = None
    if args.ood_data or args.in_dist_data:
        bundle = find_bundle(args.run_dir)
        results = [ood_results(bundle, d, expect_ood=True) for d in args.ood_data]
        results += [ood_results(bundle, d, expect_ood=False) for d in args.in_dist_data]
        (Path(args.run_dir) / "ood_results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    path = write_report(args.run_dir, args.out, ood_results=results, title=args.title)
    print(f"report written to {path}")
    return 0
