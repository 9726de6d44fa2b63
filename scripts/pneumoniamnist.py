"""PneumoniaMNIST evidence run: teacher + distilled student, KD ablation, real-CXR OOD check, report.

    python scripts/pneumoniamnist.py --out runs/pneumoniamnist           # everything (~1 h on 2 loaded cores)
    python scripts/pneumoniamnist.py --out runs/pneumoniamnist-quick --quick   # smoke (a few minutes)

Steps (each engine run is ``python -m training run training/recipes/pneumoniamnist.yaml ...`` in a
subprocess, so its wall-clock and CPU time are measured on their own):

1. **Recipe** (``<out>/main``): the teacher (resnet18_s_half) is trained on PneumoniaMNIST train, then the
   student (smallcnn_s) is distilled from it; the engine writes ``<out>/main/bundle`` (student.onnx,
   INT8, metrics with bootstrap CIs on *val*, calibration, OOD statistics, complexity table).
2. **Ablation** (``<out>/ablation/<method>-s<seed>``): the same student, data, augmentation and seed,
   trained without KD and with each KD method alone (Hinton, FitNets, AT, RKD), every run reusing the
   teacher of step 1 from the bundle (``teacher.weights: <bundle>``, ``teacher.epochs: 0``). Each
   student is evaluated on val (bootstrap 95% CIs, 1000 resamples). ``--ablation-epochs`` may be below
   the recipe's student epochs to fit the CPU budget; the table says so.
3. **Latency** re-measured with `training.complexity.compare_student_teacher` (round-robin, more runs
   than the export's quick measurement): student deployed (ORT fp32 / INT8) vs teacher.
4. **OOD check**: the deployed student (`kdviewer.inference.predict.Classifier`, exactly what the viewer
   runs) classifies ../shared/data/real-cxr (adult, full-size chest X-rays from another source and task)
   and the PneumoniaMNIST val images; the fraction flagged by the OOD guard is compared.
5. **Report**: ``<out>/report.html`` (also ``<out>/main/bundle/report.html``) with data summary, curves,
   metrics with CIs, confusion matrix, ROC, complexity, calibration, the ablation table and the OOD
   results; ``<out>/summary.json`` and ``<out>/summary.md`` hold the key numbers and tables.

Only val is used for every choice: the official test split is not available here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import ablate  # noqa: E402

RECIPE = ROOT / "training" / "recipes" / "pneumoniamnist.yaml"
SHARED = ROOT.parent / "shared" / "data"

log = logging.getLogger("pneumoniamnist")

#: The ablation arms (``kd-train ablate`` method names): no KD and each KD method alone.
ABLATION_METHODS = ("none", "hinton", "fitnets", "at", "rkd")


# --------------------------------------------------------------------------------------- engine runs


def engine_run(out_dir: Path, overrides: list[str], *, variant: str | None = None) -> dict[str, Any]:
    """The recipe in an engine subprocess (`training.ablate.engine_run`), from the project root."""
    return ablate.engine_run(RECIPE, out_dir, overrides, variant=variant, cwd=ROOT)


def load_val(data_root: Path, limit: int | None = None) -> tuple[Any, list[str], list[Path]]:
    """The recipe's val split, preprocessed exactly as in training: (loader, class names, paths)."""
    from training.config import load_config

    overrides = [f"data.root={data_root}"] + ([f"data.limit={limit}"] if limit else [])
    return ablate.val_loader(load_config(RECIPE, overrides), 256)


def evaluate_student(
    run_dir: Path, val: Any, class_names: list[str], overrides: list[str], n_boot: int
) -> Any:
    from training.config import load_config

    return ablate.evaluate_student(run_dir, load_config(RECIPE, overrides), val, class_names, n_boot)


def ablation_entries(table: dict[str, Any]) -> list[dict[str, Any]]:
    """`training.ablate` table -> the report's ablation rows (means carry [min, max] as their range)."""
    note = (
        f"ablation students trained {table['epochs']} epochs (the recipe's student: {table['recipe_epochs']})"
        if table["epochs"] != table["recipe_epochs"]
        else f"ablation students trained {table['epochs']} epochs, like the recipe's student"
    )
    entries = [
        {k: r[k] for k in ("name", "metrics", "epochs", "best_epoch", "seed", "train_s")}
        for r in table["runs"]
    ]
    for m in table["means"]:
        metrics = {
            k: {"value": v["value"], "ci_low": v["min"], "ci_high": v["max"]} for k, v in m["metrics"].items()
        }
        entries.append(
            {
                "name": f"{m['name']}: mean of {m['seeds']} seeds [min – max]",
                "metrics": metrics,
                "epochs": table["epochs"],
            }
        )
    for e in entries:
        e["note"] = note
    return entries


# ---------------------------------------------------------------------------------------- OOD check


def classify_folder(clf: Any, paths: list[Path]) -> dict[str, Any]:
    """Deployed student on each file (the viewer's path): labels, OOD scores and flags."""
    from kdviewer.imaging import load

    scores, flags, labels, failed = [], [], [], []
    for p in paths:
        try:
            pred = clf.predict(load(p))
        except Exception as exc:  # an unreadable file is reported, not fatal
            failed.append(f"{p.name}: {exc}")
            continue
        scores.append(float(pred.ood_score))
        flags.append(bool(pred.ood_flag))
        labels.append(pred.label)
    return {"scores": scores, "flags": flags, "labels": labels, "failed": failed}


def ood_check(
    bundle: Path, real_cxr: Path, val_paths: list[Path], *, threads: int, limit: int | None = None
) -> dict[str, Any]:
    """Flag rates of the OOD guard on real-cxr (should be high) and PneumoniaMNIST val (should be ~1%)."""
    import csv

    from kdviewer.inference.predict import Classifier
    from training.report import ood_verdict

    clf = Classifier(bundle, use_int8="auto", threads=threads)
    threshold = float(clf.ood.threshold) if clf.ood is not None else float("nan")
    runtime = str(getattr(clf.student, "name", "int8" if clf.int8 else "fp32"))
    rows: list[dict[str, str]] = []
    if (real_cxr / "labels.csv").is_file():
        with open(real_cxr / "labels.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        cxr_paths = [real_cxr / r["path"] for r in rows]
    else:
        cxr_paths = sorted(p for p in real_cxr.rglob("*.png"))
    if limit:
        cxr_paths, rows = cxr_paths[:limit], rows[:limit]
        val_paths = val_paths[: max(limit, 32)]
    results = []
    for name, paths, expect_ood in (
        ("real-cxr (adult, full-size; other source and task)", cxr_paths, True),
        ("PneumoniaMNIST val (in distribution)", val_paths, False),
    ):
        r = classify_folder(clf, paths)
        scores = np.asarray(r["scores"], dtype=np.float64)
        n_flag = int(np.sum(r["flags"]))
        flagged = n_flag / len(r["flags"]) if r["flags"] else float("nan")
        shift, verdict = ood_verdict(n_flag, len(r["flags"]), expect_ood)
        entry = {
            "name": name,
            "n": len(scores),
            "scores": [round(float(s), 3) for s in scores],
            "median_score": float(np.median(scores)) if len(scores) else float("nan"),
            "flagged_fraction": flagged,
            "n_flagged": n_flag,
            "shift_p_value": shift.p_value,
            "threshold": threshold,
            "expected": "flagged (out of distribution)" if expect_ood else "not flagged (in distribution)",
            "verdict": verdict,
            "predicted": {c: r["labels"].count(c) for c in dict.fromkeys(r["labels"])},
            "runtime": runtime,
            "failed": r["failed"],
        }
        if expect_ood and rows:
            by_label: dict[str, list[bool]] = {}
            for row, flag in zip(rows, r["flags"], strict=False):
                by_label.setdefault(row.get("label", "?"), []).append(flag)
            entry["flagged_by_label"] = {k: f"{sum(v)}/{len(v)}" for k, v in by_label.items()}
        results.append(entry)
    return {"threshold": threshold, "runtime": runtime, "results": results}


# -------------------------------------------------------------------------------------------- latency


def measure_latency(bundle: Path, *, runs: int, threads: int) -> dict[str, Any]:
    """compare_student_teacher on the bundle's models (student ONNX/INT8 files as deployed)."""
    from kdviewer.models.bundle import open_bundle
    from training.complexity import compare_student_teacher
    from training.zoo import create_model

    with open_bundle(bundle) as b:
        m = b.manifest
        pre = m.preprocessing
        k = len(m.class_names)
        student = create_model(m.student.architecture, k, pre.channels, 0.0, str(bundle), role="student")
        teacher = (
            create_model(m.teacher.architecture, k, pre.channels, 0.0, str(bundle), role="teacher")
            if m.teacher is not None
            else None
        )
        cal = np.random.default_rng(0).normal(0, 1, (32, pre.channels, pre.input_size, pre.input_size))
        return compare_student_teacher(
            student.eval(),
            teacher.eval() if teacher is not None else None,
            input_size=pre.input_size,
            channels=pre.channels,
            student_onnx=b.onnx_path(),
            student_int8=b.onnx_path(int8=True) if m.student.onnx_int8 else None,
            calibration=cal.astype(np.float32),
            threads=threads,
            runs=runs,
        )


# -------------------------------------------------------------------------------------------- summary


def _ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    if not m or m.get("value") is None:
        return "–"
    v = f"{m['value']:.{digits}f}"
    if m.get("ci_low") is not None and m.get("ci_high") is not None:
        v += f" ({m['ci_low']:.{digits}f}–{m['ci_high']:.{digits}f})"
    return v


def summary_markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    ev = summary.get("evaluation", {})
    lines += ["### Val metrics (bootstrap 95% CI, 1000 resamples; val = 135 NORMAL + 389 PNEUMONIA)", ""]
    lines += [
        "| model | ACC | ROC-AUC | sensitivity | specificity | balanced ACC |",
        "|---|---|---|---|---|---|",
    ]
    for role in ("teacher", "student"):
        m = ev.get(role)
        if m:
            lines.append(
                f"| {role} ({summary['archs'][role]}) | {_ci(m.get('accuracy'))} | {_ci(m.get('roc_auc'))} | "
                f"{_ci(m.get('recall'))} | {_ci(m.get('specificity'))} | {_ci(m.get('balanced_accuracy'))} |"
            )
    cx = summary.get("latency", {})
    if cx:
        lines += [
            "",
            f"### Complexity (batch 1, 28x28, threads = {cx.get('settings', {}).get('threads')})",
            "",
        ]
        lines += [
            "| model | params | GFLOPs | torch fp32 ms | ORT fp32 ms | ORT INT8 ms |",
            "|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for role in ("teacher", "student"):
            r = cx.get(role)
            if r:
                lat = r.get("latency_ms", {})
                lines.append(
                    f"| {role} | {r['params'] / 1e6:.3f} M | {r['gflops']:.4f} | "
                    f"{lat.get('torch_fp32', nan):.3f} | {lat.get('ort_fp32', nan):.3f} | "
                    f"{lat.get('ort_int8', nan):.3f} |"
                )
        ratios = cx.get("ratios", {})
        if "deployed_latency_ratio" in ratios:
            lines += [
                "",
                f"Deployed latency ratio student/teacher = **{ratios['deployed_latency_ratio']:.3f}** "
                "(student's fastest ORT runtime vs the teacher's fastest runtime; goal <= 0.25).",
            ]
    abl = summary.get("ablation") or []
    if abl:
        lines += ["", f"### Ablation ({abl[0].get('note', '')}; val, bootstrap 95% CI)", ""]
        lines += ["| student | ACC | ROC-AUC | balanced ACC | best epoch |", "|---|---|---|---|---|"]
        for e in abl:
            m = e["metrics"]
            lines.append(
                f"| {e['name']} | {_ci(m.get('accuracy'))} | {_ci(m.get('roc_auc'))} | "
                f"{_ci(m.get('balanced_accuracy'))} | {e.get('best_epoch') or '–'} |"
            )
    ood = summary.get("ood", {}).get("results") or []
    nan = float("nan")
    if ood:
        lines += ["", f"### OOD guard (deployed student, {summary['ood'].get('runtime')})", ""]
        lines += [
            "| data | images | flagged | median score | threshold | dataset shift p | expected | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ood:
            lines.append(
                f"| {r['name']} | {r['n']} | {r['n_flagged']} ({100 * r['flagged_fraction']:.1f}%) | "
                f"{r['median_score']:.2f} | {r['threshold']:.2f} | {r.get('shift_p_value', nan):.2g} | "
                f"{r['expected']} | {r['verdict']} |"
            )
    t = summary.get("timing", {})
    if t:
        lines += ["", "### Time", ""]
        for k, v in t.items():
            lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pneumoniamnist", help="output folder")
    p.add_argument("--data", default=str(SHARED), help="the shared data folder (pneumoniamnist/, real-cxr/)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images per split, 1 epoch each")
    p.add_argument("--threads", type=int, default=1, help="torch/ORT threads of the recipe run and latency")
    p.add_argument("--ablation-epochs", type=int, default=None, help="student epochs of each ablation run")
    p.add_argument("--ablation-seeds", default="0", help="comma-separated seeds of the ablation")
    p.add_argument("--jobs", type=int, default=2, help="ablation runs in parallel (1 thread each when > 1)")
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--skip-main", action="store_true", help="reuse <out>/main (already trained)")
    p.add_argument(
        "--reuse-ablation-runs",
        action="store_true",
        help="keep finished ablation runs in <out>/ablation (e.g. to add a seed)",
    )
    p.add_argument(
        "--skip-ablation", action="store_true", help="reuse <out>/main/ablation.json when it exists"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from training.config import load_config

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    pm_root = data / "pneumoniamnist"
    if not (pm_root / "train").is_dir():
        log.error("%s not found: this run needs ../shared/data/pneumoniamnist (see its README)", pm_root)
        return 2
    variant = "quick" if args.quick else None
    cfg = load_config(RECIPE, [f"data.root={pm_root}"], variant)
    limit = cfg.data.limit
    base = [f"data.root={pm_root}"] + ([f"data.limit={limit}"] if limit else [])
    n_boot = 100 if args.quick else 1000
    summary: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.executable).name, "scripts/pneumoniamnist.py", *(argv or sys.argv[1:])]
        ),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "quick": args.quick,
        "archs": {"teacher": cfg.teacher.arch if cfg.teacher else None, "student": cfg.student.arch},
        "host": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
    }
    t_all = time.time()
    previous: dict[str, Any] = {}
    if (args.skip_main or args.skip_ablation or args.reuse_ablation_runs) and (
        out / "summary.json"
    ).is_file():
        previous = json.loads((out / "summary.json").read_text(encoding="utf-8"))

    # 1. the recipe -------------------------------------------------------------------------------
    main_dir = out / "main"
    if not args.skip_main:
        log.info("recipe: teacher + student -> %s", main_dir)
        overrides = [*base, f"runtime.threads={args.threads}"]
        loadavg_start = list(os.getloadavg())
        summary["main_run"] = engine_run(main_dir, overrides, variant=variant)
        summary["main_run"]["loadavg_start"] = loadavg_start
        summary["main_run"]["loadavg_end"] = list(os.getloadavg())
        log.info(
            "recipe done in %.0f s (wall), %.0f CPU-s",
            summary["main_run"]["wall_s"],
            summary["main_run"]["cpu_s"],
        )
    else:
        summary["main_run"] = previous.get("main_run") or {
            "reused": str(main_dir),
            **ablate.stage_times(main_dir / "events.jsonl"),
        }
    bundle = main_dir / "bundle"

    # 2. evaluation of the recipe's models (from the bundle's evaluation.json) ---------------------
    evaluation = json.loads((bundle / "evaluation.json").read_text(encoding="utf-8"))
    val_loader, class_names, val_paths = load_val(pm_root, limit)
    summary["evaluation"] = {}
    for role in ("teacher", "student"):
        res = (evaluation.get(role) or {}).get("val")
        if res:
            summary["evaluation"][role] = dict(res["metrics"])
            summary["evaluation"][role + "_confusion_matrix"] = res.get("confusion_matrix")
    # balanced accuracy of the student (same val images, deployed-equivalent torch weights)
    st = evaluate_student(main_dir, val_loader, class_names, [f"data.root={pm_root}"], n_boot)
    summary["evaluation"]["student"]["balanced_accuracy"] = st["metrics"]["balanced_accuracy"]
    if cfg.teacher is not None:
        import torch

        from training.evaluate import evaluate_model
        from training.zoo import create_model

        teacher = create_model(cfg.teacher.arch, len(class_names), 1, 0.0, str(bundle), role="teacher")
        with torch.inference_mode():
            tres = evaluate_model(teacher, val_loader, class_names, "single-label", "cpu")
        summary["evaluation"]["teacher"]["balanced_accuracy"] = ablate.balanced_accuracy(
            tres["targets"], tres["probs"].argmax(1), n_boot
        )

    # 3. ablation -----------------------------------------------------------------------------------
    ablation: list[dict[str, Any]] = []
    if not args.skip_ablation:
        seeds = [int(s) for s in args.ablation_seeds.split(",") if s.strip()]
        epochs = args.ablation_epochs or cfg.optim.epochs
        jobs = max(1, args.jobs)
        t_abl = time.time()
        table = ablate.run_ablation(
            RECIPE,
            out / "ablation",
            bundle,
            methods=ABLATION_METHODS,
            seeds=seeds,
            base_overrides=base,
            epochs=epochs,
            jobs=jobs,
            threads=1 if jobs > 1 else args.threads,
            n_boot=n_boot,
            cwd=ROOT,
        )
        ablation, infos = ablation_entries(table), table["runs"]
        summary["ablation_runs"] = infos
        summary["ablation_wall_s"] = round(time.time() - t_abl, 1)
    elif (main_dir / "ablation.json").is_file():  # reuse the earlier ablation
        ablation = json.loads((main_dir / "ablation.json").read_text(encoding="utf-8"))
        for key in ("ablation_runs", "ablation_wall_s"):
            if key in previous:
                summary[key] = previous[key]
    summary["ablation"] = ablation

    # 4. latency -------------------------------------------------------------------------------------
    log.info("latency: student vs teacher (%d round-robin runs)", args.latency_runs)
    summary["latency"] = measure_latency(
        bundle, runs=5 if args.quick else args.latency_runs, threads=args.threads
    )

    # 5. OOD check -----------------------------------------------------------------------------------
    real_cxr = data / "real-cxr"
    if real_cxr.is_dir():
        log.info("OOD check on %s and PneumoniaMNIST val", real_cxr)
        summary["ood"] = ood_check(
            bundle, real_cxr, val_paths, threads=args.threads, limit=8 if args.quick else None
        )
    else:
        log.warning("%s not found: OOD check skipped", real_cxr)
        summary["ood"] = {"results": []}
    summary["ood"]["export_val_flagged_fraction"] = (
        (evaluation.get("ood") or {}).get("val_scores", {}).get("flagged_fraction")
    )

    # 6. report --------------------------------------------------------------------------------------
    from training.report import write_report

    ood_results = [
        {k: v for k, v in r.items() if k not in ("failed",)} for r in summary["ood"].get("results", [])
    ]
    (main_dir / "ablation.json").write_text(json.dumps(ablation, indent=1), encoding="utf-8")
    (main_dir / "ood_results.json").write_text(json.dumps(ood_results, indent=1), encoding="utf-8")
    title = "PneumoniaMNIST: distilled student" + (" (QUICK SMOKE RUN)" if args.quick else "")
    report = write_report(
        main_dir, bundle / "report.html", ablation=ablation, ood_results=ood_results, title=title
    )
    shutil.copy2(report, out / "report.html")
    mr = summary["main_run"]
    ablation_train_s = sum(
        float((i.get("stages", {}).get("student", {}) or {}).get("train_s") or 0.0)
        for i in summary.get("ablation_runs", [])
    )
    load_start = mr.get("loadavg_start") or (previous.get("host") or summary["host"])["loadavg_start"]
    summary["timing"] = {
        "recipe (teacher + student + export), wall-clock": f"{mr.get('wall_s', '?')} s",
        "recipe CPU time (user + sys)": f"{mr.get('cpu_s', '?')} s",
        "teacher training": f"{mr.get('stages', {}).get('teacher', {}).get('train_s', '?')} s",
        "student training": f"{mr.get('stages', {}).get('student', {}).get('train_s', '?')} s",
        "load average at start / end of the recipe": f"{load_start[0]:.1f} / "
        f"{(mr.get('loadavg_end') or [float('nan')])[0]:.1f}",
        "ablation student training, summed over runs": f"{ablation_train_s:.0f} s"
        f" ({len(summary.get('ablation_runs', []))} runs)",
        "whole script wall-clock": f"{time.time() - t_all:.0f} s",
    }
    if previous.get("timing"):
        summary["timing"]["whole script wall-clock"] += " (this pass, reusing earlier runs)"
        summary["timing"]["first pass, whole script wall-clock"] = previous["timing"].get(
            "whole script wall-clock", "?"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    md = summary_markdown(summary)
    (out / "summary.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
