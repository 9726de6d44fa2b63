"""Evaluation inside a run: the per-epoch validation pass and the run's ``eval`` events.

`evaluate` (loss, accuracy, macro AUC, probabilities) runs after every epoch and for the metrics of a
run without export; `bundle_eval_events` replays a written bundle's ``evaluation.json`` as ``eval``
events; `own_eval_events` computes metrics with CIs (``training.metrics``) when no bundle is written.
The bundle's own, fuller evaluation lives in ``training.export`` / ``training.evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import BatchLoader
from training.losses import task_loss
from training.placement import Placement
from training.run_context import RunContext


def _auc(y: np.ndarray, p: np.ndarray, task: str) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        if task == "multi-label":
            cols = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
            return float(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in cols])) if cols else float("nan")
        if p.shape[1] == 2:
            return float(roc_auc_score(y == 1, p[:, 1])) if 0 < (y == 1).sum() < len(y) else float("nan")
        if len(np.unique(y)) < p.shape[1]:
            return float("nan")
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    except ValueError:
        return float("nan")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, task: str, placement: Placement) -> dict[str, Any]:
    """Loss, accuracy and macro AUC of ``model`` on ``loader`` (plus ``probs``/``targets`` arrays).

    ``placement`` puts the model and every batch on the same device, dtype and layout (the model is
    moved there in place if it was elsewhere).
    """
    model = placement.model(model)
    was_training = model.training
    model.eval()
    logits_l, targets_l = [], []
    try:
        for _, x, y in placement.batches(loader):
            with placement.autocast():
                out = model(x)
            logits_l.append(out.float().cpu())
            targets_l.append(y.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(logits_l)
    targets = torch.cat(targets_l)
    multi = task == "multi-label"
    loss = float(task_loss(logits, targets, multi))
    if multi:
        probs = torch.sigmoid(logits).numpy()
        y = targets.numpy()
        acc = float(((probs >= 0.5) == (y >= 0.5)).mean())
    else:
        probs = torch.softmax(logits, 1).numpy()
        y = targets.numpy()
        acc = float((probs.argmax(1) == y).mean())
    return {"loss": loss, "accuracy": acc, "auc": _auc(y, probs, task), "probs": probs, "targets": y}



def bundle_eval_events(ctx: RunContext, bundle: Path) -> dict[str, Any]:
    import json

    path = bundle / "evaluation.json"
    if not path.is_file():
        return {}
    evaluation = json.loads(path.read_text(encoding="utf-8"))
    for role in ("teacher", "student"):
        for split, res in (evaluation.get(role) or {}).items():
            if isinstance(res, dict) and "metrics" in res:
                ctx.events.emit(
                    "eval",
                    stage=role,
                    split=split,
                    metrics=res["metrics"],
                    confusion_matrix=res.get("confusion_matrix"),
                    class_names=res.get("class_names"),
                )
    return evaluation


def own_eval_events(ctx: RunContext, model: nn.Module, stage: str) -> dict[str, Any]:
    """Metrics without a bundle (``output.export: false``): training.metrics on val (and test)."""
    from training.metrics import compute_metrics

    out = {}
    for split in ("val", "test"):
        if split not in ctx.loaders:
            continue
        res = evaluate(model, ctx.loaders[split], ctx.cfg.task, ctx.placement)
        m = compute_metrics(
            res["targets"],
            res["probs"],
            ctx.splits.class_names,
            ctx.cfg.task,
            n_boot=ctx.cfg.output.bootstrap,
        )
        ctx.events.emit(
            "eval",
            stage=stage,
            split=split,
            metrics=m["metrics"],
            confusion_matrix=m.get("confusion_matrix"),
            class_names=ctx.splits.class_names,
        )
        out[split] = m
    return out

