"""KD ablation: the recipe's student trained without KD and with each KD method, over seeds, one table.

    kd-train ablate RECIPE --methods none,hinton,fitnets --seeds 0,1 [--teacher BUNDLE] [--jobs 2]

Every run is the recipe itself (same data, split, preprocessing, student, optimiser and epochs) in its own
engine subprocess (``python -m training run RECIPE --set ...``, so each run's wall and CPU time are its
own), with only the distillation changed:

* ``none``: no teacher at all (``teacher: null``, no KD methods) — the baseline;
* ``teacher``: the recipe's teacher trained alone (its architecture, weights, freeze, dropout, batch-norm
  momentum, epochs and optimiser overrides, no KD) with that seed, to show the teacher's own spread over
  seeds. For the recipe's own seed the ``--teacher`` weights are evaluated instead of training a twin:
  they are that run's teacher stage;
* any KD method name (``hinton``, ``fitnets``, ``at``, ``rkd``, ``sp``): that method alone, with the
  recipe's own settings for it when the recipe uses it, else its defaults; the teacher is the one
  trained by the recipe's main run (``--teacher``: its bundle, default ``<output.dir>/bundle``, or its
  ``checkpoints/teacher.pt`` as soon as the teacher stage has finished), frozen
  (``teacher.epochs: 0``), so every student learns from the same teacher.

Each student's best-val checkpoint is then evaluated on the val split (never test) with bootstrap 95%
CIs (multi-label tasks: macro AUC and every label's AUC with its CI, and each label's number of val
positives); with several seeds the table adds each method's mean over seeds with its [min – max] (the spread
between training runs, which the CIs do not cover). Output: ``<out>/<method>-s<seed>/`` (engine runs),
``<out>/ablation.json`` and ``<out>/ablation.md``. A rerun skips runs that already finished with the
same number of epochs, so a killed ablation resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from training.config import RunConfig, load_config, resolve_recipe

log = logging.getLogger(__name__)

METHODS = ("none", "teacher", "hinton", "fitnets", "at", "rkd", "sp")
LABELS = {
    "none": "no KD",
    "teacher": "teacher",
    "hinton": "Hinton",
    "fitnets": "FitNets",
    "at": "AT",
    "rkd": "RKD",
    "sp": "SP",
}


def _json(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: what `--set key=value` parses


def method_settings(cfg: RunConfig, name: str) -> list[dict[str, Any]] | None:
    """kd.methods for one ablation arm: None for "none" / "teacher", else the recipe's settings of it."""
    if name == "teacher" and cfg.teacher is None:
        raise ValueError("method 'teacher': this recipe has no teacher")
    if name in ("none", "teacher"):
        return None
    if name not in METHODS:
        raise ValueError(f"unknown KD method {name!r}; choose from {', '.join(METHODS)}")
    own = cfg.kd.method(name)
    return [own.model_dump(mode="json") if own is not None else {"name": name}]


def stage_times(events: Path) -> dict[str, Any]:
    """Per-stage training seconds, epochs and best epoch from a run's events.jsonl."""
    out: dict[str, Any] = {"stages": {}}
    if not events.is_file():
        return out
    for line in events.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "epoch_end":
            st = out["stages"].setdefault(ev["stage"], {"train_s": 0.0, "epochs": 0, "epoch_s": []})
            st["train_s"] = round(st["train_s"] + float(ev.get("epoch_time_s", 0.0)), 1)
            st["epochs"] += 1
            st["epoch_s"].append(round(float(ev.get("epoch_time_s", 0.0)), 1))
            if ev.get("best"):
                st["best_epoch"] = ev["epoch"]
                st["best_val"] = ev.get("val")
        elif ev.get("event") == "run_end":
            out["engine_elapsed_s"] = round(float(ev.get("elapsed_s") or 0.0), 1)
    return out


def engine_run(
    recipe: Path,
    out_dir: Path,
    overrides: Sequence[str],
    *,
    variant: str | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run the engine on ``recipe`` in a subprocess; returns rc, wall and CPU seconds, output dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "training", "run", str(recipe), "--set", f"output.dir={out_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    if variant:
        cmd += ["--variant", variant]
    log_file = out_dir / "engine.log"
    t0 = time.time()
    with open(log_file, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    result = {
        "rc": rc,
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "out_dir": str(out_dir),
        "command": " ".join(cmd),
        "log": str(log_file),
    }
    result.update(stage_times(out_dir / "events.jsonl"))
    if rc != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"engine run in {out_dir} failed (exit {rc}):\n" + "\n".join(tail))
    return result


def finished(run_dir: Path, epochs: int) -> bool:
    """An engine run that ended (run_end) after ``epochs`` student epochs, with its best checkpoint."""
    import yaml

    try:
        events = (run_dir / "events.jsonl").read_text(encoding="utf-8")
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except OSError:
        return False
    return (
        '"event":"run_end"' in events.replace(" ", "")
        and (run_dir / "checkpoints" / "best_student.pt").is_file()
        and cfg.get("optim", {}).get("epochs") == epochs
    )


def val_loader(cfg: RunConfig, batch_size: int = 128) -> tuple[Any, list[str], list[Path]]:
    """The recipe's val split, preprocessed exactly as in training: (loader, class names, paths)."""
    from training.data import BatchLoader, build_datasets, discover

    splits = discover(cfg.data, cfg.task, cfg.data.seed if cfg.data.seed is not None else cfg.runtime.seed)
    splits.train = []  # only val is needed
    sets = build_datasets(splits, cfg.preprocessing.to_manifest(), cfg.data)
    val = sets["val"]
    return BatchLoader(val, batch_size), list(splits.class_names), [s.path for s in val.samples]


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of the per-class recalls, with a bootstrap 95% CI (same resampling scheme as the metrics)."""

    def bacc(yy: np.ndarray, pp: np.ndarray) -> float:
        classes = np.unique(yy)
        return float(np.mean([np.mean(pp[yy == c] == c) for c in classes]))

    rng = np.random.default_rng(seed)
    boots = [bacc(y[i], pred[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if n_boot else (float("nan"), float("nan"))
    return {"value": bacc(y, pred), "ci_low": float(lo), "ci_high": float(hi)}


def evaluate_student(
    run_dir: Path,
    cfg: RunConfig,
    loader: Any,
    class_names: list[str],
    n_boot: int = 1000,
    *,
    arch: str | None = None,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Val metrics (bootstrap CIs) of the best-val student checkpoint of an engine run (or of ``weights``,
    a state dict / bundle of ``arch``: the recipe's teacher)."""
    import torch

    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate_model
    from training.metrics import compute_metrics
    from training.zoo import create_model

    sc = cfg.student
    if weights is not None:
        channels = cfg.preprocessing.channels
        model = create_model(arch or sc.arch, len(class_names), channels, weights=str(weights))
    else:
        model = create_model(arch or sc.arch, len(class_names), cfg.preprocessing.channels, sc.dropout)
        model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best_student.pt"))
    with torch.inference_mode():
        res = evaluate_model(model, loader, class_names, cfg.task, "cpu")
    m = compute_metrics(res["targets"], res["probs"], class_names, cfg.task, n_boot=n_boot)
    keys = ("accuracy", "roc_auc", "recall", "specificity", "f1")
    metrics = {k: m["metrics"][k] for k in keys if k in m["metrics"]}
    if cfg.task == "single-label":
        metrics["balanced_accuracy"] = balanced_accuracy(res["targets"], res["probs"].argmax(1), n_boot)
    else:  # every label's AUC with its CI (NaN when val has no positive of it)
        metrics.update({k: v for k, v in m["metrics"].items() if k.startswith("roc_auc:")})
    return {"metrics": metrics, "confusion_matrix": m.get("confusion_matrix"), "support": m.get("support")}


def teacher_alone_overrides(cfg: RunConfig) -> list[str]:
    """``--set`` overrides that make a recipe run train its teacher as the (only) model, without KD."""
    tc = cfg.teacher
    assert tc is not None
    out = [
        f"student.arch={tc.arch}",
        f"student.weights={tc.weights}",
        f"student.dropout={tc.dropout}",
        f"student.freeze={_json(tc.freeze)}",
        f"student.bn_momentum={_json(tc.bn_momentum)}",
        "teacher=null",
        "kd.methods=[]",
    ]
    if tc.optim is not None:
        for key, value in tc.optim.model_dump(exclude_none=True).items():
            out.append(f"optim.{key}={_json(value)}")
    return out


def run_ablation(
    recipe: Path,
    out: Path,
    teacher: Path,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    base_overrides: Sequence[str] = (),
    variant: str | None = None,
    epochs: int | None = None,
    jobs: int = 1,
    threads: int | None = None,
    n_boot: int = 1000,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Train every (method, seed) student (``jobs`` at a time), evaluate each on val; returns the table.

    Finished runs in ``out`` (same epochs) are reused, so a killed ablation continues where it stopped.
    """
    cfg = load_config(recipe, list(base_overrides), variant)
    main_epochs = cfg.optim.epochs
    epochs = epochs or main_epochs
    todo = []
    given: dict[tuple[str, int], Path] = {}  # (method, seed) evaluated from existing weights
    for seed in seeds:
        for name in methods:
            kd = method_settings(cfg, name)
            run_epochs = epochs
            if name == "teacher":
                assert cfg.teacher is not None
                if seed == cfg.runtime.seed and teacher.exists():
                    given[(name, seed)] = teacher
                    continue
                run_epochs = cfg.teacher.epochs
            overrides = [
                *base_overrides,
                f"optim.epochs={run_epochs}",
                f"runtime.seed={seed}",
                "output.export=false",
            ]
            if threads:
                overrides.append(f"runtime.threads={threads}")
            if cfg.data.seed is None:  # the split stays the recipe's, whatever the training seed
                overrides.append(f"data.seed={cfg.runtime.seed}")
            if name == "teacher":
                overrides += teacher_alone_overrides(cfg)
            elif kd is None:
                overrides += ["teacher=null", "kd.methods=[]"]
            else:
                overrides += [f"teacher.weights={teacher}", "teacher.epochs=0", f"kd.methods={_json(kd)}"]
            todo.append((name, seed, out / f"{name}-s{seed}", overrides, run_epochs))

    def work(item: tuple[str, int, Path, list[str], int]) -> dict[str, Any]:
        name, seed, run_dir, overrides, run_epochs = item
        if finished(run_dir, run_epochs):
            log.info("ablation: %s (seed %d) reused from %s", name, seed, run_dir)
            info = {"out_dir": str(run_dir), **stage_times(run_dir / "events.jsonl"), "reused": True}
        else:
            log.info("ablation: %s (seed %d) -> %s", name, seed, run_dir)
            info = engine_run(recipe, run_dir, overrides, variant=variant, cwd=cwd)
            log.info("ablation: %s (seed %d) done in %.0f s", name, seed, info["wall_s"])
        info.update(method=name, seed=seed)
        return info

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = {(i["method"], i["seed"]): i for i in pool.map(work, todo)}
    infos = []
    for seed in seeds:  # in the order asked for, given (method, seed) pairs included
        for name in methods:
            if (name, seed) in given:
                weights = str(given[(name, seed)])
                infos.append({"method": name, "seed": seed, "weights": weights, "stages": {}})
            else:
                infos.append(done[(name, seed)])
    loader, class_names, val_paths = val_loader(cfg)
    rows = []
    support = None
    for info in infos:
        is_teacher = info["method"] == "teacher"
        arch = cfg.teacher.arch if is_teacher and cfg.teacher is not None else None
        weights = Path(info["weights"]) if info.get("weights") else None
        ev = evaluate_student(
            Path(info.get("out_dir", ".")), cfg, loader, class_names, n_boot, arch=arch, weights=weights
        )
        support = ev.get("support")
        st = info["stages"].get("student", {})
        rows.append(
            {
                "name": LABELS[info["method"]] + ("" if len(seeds) == 1 else f" (seed {info['seed']})"),
                "method": info["method"],
                "seed": info["seed"],
                "metrics": ev["metrics"],
                "confusion_matrix": ev["confusion_matrix"],
                "epochs": cfg.teacher.epochs if is_teacher and cfg.teacher is not None else epochs,
                "best_epoch": st.get("best_epoch"),
                "train_s": st.get("train_s"),
                "wall_s": info.get("wall_s"),
                "cpu_s": info.get("cpu_s"),
                "weights": info.get("weights"),
            }
        )
    means = []
    if len(seeds) > 1:
        for name in methods:
            runs = [r for r in rows if r["method"] == name]
            mean: dict[str, Any] = {}
            for key in runs[0]["metrics"]:
                vals = [r["metrics"][key]["value"] for r in runs]
                mean[key] = {"value": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}
            means.append({"name": LABELS[name], "method": name, "seeds": len(runs), "metrics": mean})
    return {
        "recipe": str(recipe),
        "teacher": str(teacher),
        "task": cfg.task,
        "class_names": list(class_names),
        "support": support,
        "split": "val",
        "n_val": len(val_paths),
        "epochs": epochs,
        "recipe_epochs": main_epochs,
        "seeds": list(seeds),
        "runs": rows,
        "means": means,
        "wall_s": round(time.time() - t0, 1),
    }


def _fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    if "ci_low" in m:
        return f"{m['value']:.3f} ({m['ci_low']:.3f}–{m['ci_high']:.3f})"
    return f"{m['value']:.3f} [{m['min']:.3f}–{m['max']:.3f}]"


def markdown(table: dict[str, Any]) -> str:
    """The ablation as Markdown: one row per run (95% CIs), then per-method means [min – max]."""
    keys = ("accuracy", "roc_auc", "balanced_accuracy", "recall", "specificity")
    head = "| student | " + " | ".join(keys) + " | best epoch | train s |"
    lines = [
        f"Ablation on the **val** split ({table['n_val']} images), {table['epochs']} student epochs "
        f"(recipe: {table['recipe_epochs']}), teacher `{table['teacher']}`; bootstrap 95% CIs.",
        "",
        head,
        "|" + "---|" * (len(keys) + 3),
    ]
    for r in table["runs"]:
        cells = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['best_epoch']} | {r['train_s']} |")
    if table["means"]:
        lines += ["", f"Mean over {len(table['seeds'])} seeds [min – max]:", "", head, lines[3]]
        for r in table["means"]:
            cells = [_fmt(r["metrics"].get(k)) for k in keys]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " | | |")
    if table.get("task") == "multi-label":
        lines += ["", *per_label_markdown(table)]
    return "\n".join(lines) + "\n"


def per_label_markdown(table: dict[str, Any]) -> list[str]:
    """Multi-label: each label's val AUC (95% CI) per run, then per method the mean over seeds [min – max],
    with the number of val positives of each label."""
    names = table.get("class_names") or []
    support = table.get("support") or [None] * len(names)

    def auc_table(title: str, columns: list[dict[str, Any]]) -> list[str]:
        lines = [
            title,
            "",
            "| label | pos | " + " | ".join(c["name"] for c in columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        for k, n in enumerate(names):
            cells = [_fmt(c["metrics"].get(f"roc_auc:{n}")) for c in columns]
            lines.append(f"| {n} | {support[k]} | " + " | ".join(cells) + " |")
        macro = [_fmt(c["metrics"].get("roc_auc")) for c in columns]
        lines.append("| **macro** | | " + " | ".join(f"**{c}**" for c in macro) + " |")
        return lines

    lines = auc_table(
        "Per-label ROC-AUC on val (bootstrap 95% CI); `pos` = val images with the label:", table["runs"]
    )
    if table.get("means"):
        title = f"Per-label ROC-AUC on val, mean over {len(table['seeds'])} seeds [min – max]:"
        lines += ["", *auc_table(title, table["means"])]
    return lines


def cmd_ablate(args: argparse.Namespace) -> int:
    recipe = resolve_recipe(args.config)
    cfg = load_config(recipe, args.overrides, args.variant)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for m in methods:
        method_settings(cfg, m)  # unknown names fail here, before any training
    teacher = Path(args.teacher) if args.teacher else Path(cfg.output.dir) / "bundle"
    if (
        any(m != "none" for m in methods)
        and not (teacher / "manifest.json").is_file()
        and not (teacher.suffix in (".zip", ".pt") and teacher.is_file())
    ):
        print(
            f"kd-train ablate: no teacher at {teacher}: run the recipe first "
            f"(kd-train run {args.config}) or pass --teacher BUNDLE|TEACHER.pt",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out) if args.out else Path(cfg.output.dir).parent / "ablation"
    table = run_ablation(
        recipe,
        out,
        teacher.resolve(),
        methods=methods,
        seeds=seeds,
        base_overrides=args.overrides,
        variant=args.variant,
        epochs=args.epochs,
        jobs=args.jobs,
        threads=args.threads,
        n_boot=args.bootstrap,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    md = markdown(table)
    (out / "ablation.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"written: {out / 'ablation.json'}, {out / 'ablation.md'}")
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser("ablate", help="KD ablation of a recipe: no KD vs each method, over seeds, one table")
    p.add_argument("config", help="run file (YAML) or a packaged recipe name")
    p.add_argument(
        "--methods", default="none,hinton,fitnets", help=f"comma-separated, from {','.join(METHODS)}"
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (the split stays fixed)")
    p.add_argument(
        "--teacher", default=None, help="teacher bundle or state-dict .pt (default: <output.dir>/bundle)"
    )
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the recipe's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--out", default=None, help="output folder (default: <output.dir>/../ablation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", default=None)
    p.set_defaults(func=cmd_ablate)
