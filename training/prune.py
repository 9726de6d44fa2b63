"""L1 structured pruning that really removes channels, and the ``kd-train prune`` command.

`prune_model` shrinks the *internal* channels of every residual block of a ResNet-style network
(torchvision ``BasicBlock``: the output of ``conv1``; ``Bottleneck``: the outputs of ``conv1`` and
``conv2``). For each such convolution the filters with the smallest L1 norm are dropped, and the
convolution, the BatchNorm after it and the input side of the next convolution are rebuilt with
fewer channels (weights of kept channels copied). Block outputs are untouched, so residual
additions, downsample branches and the classifier keep their shapes: the network is a smaller
network of the same topology, and params, FLOPs and latency drop for real (no masks).

The pruned structure is recorded as a *channel config* ``{"layer1.0.conv1": 45, ...}`` (output
channels of every pruned convolution, `channel_config`). `apply_channel_config` rebuilds a freshly
built model to that shape so that ``load_state_dict`` of the pruned weights works; export stores the
config in ``manifest.training["pruned_channels"]`` (the ONNX file needs nothing: its graph already
has the small shapes). `apply_channel_config` only needs torch so the viewer can use it as is.

Fine-tuning after pruning is the engine's job; `finetune` is a small plain cross-entropy loop used
by the CLI when ``--finetune-epochs`` is given.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdviewer.models.architectures import get_module
from kdviewer.models.pruning import (
    apply_channel_config,
    channel_config,
    prunable_pairs,
    prune_model,
)

log = logging.getLogger(__name__)


def expected_param_fraction(model: nn.Module, ratio: float) -> float:
    """Rough fraction of parameters removed by `prune_model` at ``ratio`` (for sanity checks)."""
    total = sum(p.numel() for p in model.parameters())
    removed = 0.0
    keep = 1.0 - ratio
    pruned_in: set[str] = set()
    pruned_out: set[str] = set()
    for conv_p, _, next_p in prunable_pairs(model):
        pruned_out.add(conv_p)
        pruned_in.add(next_p)
    for name in pruned_out | pruned_in:
        w = get_module(model, name).weight.numel()  # type: ignore[union-attr]
        factor = (keep if name in pruned_out else 1.0) * (keep if name in pruned_in else 1.0)
        removed += w * (1.0 - factor)
    return removed / total


# ------------------------------------------------------------------------------------- fine-tuning


def finetune(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    *,
    task: str = "single-label",
    lr: float = 1e-3,
    device: str = "cpu",
    weight_decay: float = 1e-5,
    log_every: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Plain supervised fine-tuning (Adam, CE or BCE) of a pruned model; returns per-epoch losses."""
    from training.placement import Placement

    place = Placement(torch.device(device))  # model and batches on one device, fp32
    model = place.model(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if task == "multi-label" else nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for step, (x, y) in enumerate(loader, 1):
            x, y = place.inputs(x), torch.as_tensor(y).to(place.device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y.float() if task == "multi-label" else y.long())
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
            if log_every and step % log_every == 0:
                log.info("finetune epoch %d step %d loss %.4f", epoch, step, float(loss))
        history.append({"epoch": epoch, "stage": "finetune", "train_loss": total / max(1, count)})
        if progress is not None:
            progress(f"fine-tuning: epoch {epoch}/{epochs}, train loss {total / max(1, count):.4f}")
    model.eval()
    return history


# --------------------------------------------------------------------------------------------- CLI


def prune_bundle(
    bundle_path: str | Path,
    ratio: float,
    out: str | Path,
    *,
    data: str | Path | None = None,
    finetune_epochs: int = 0,
    lr: float = 1e-4,
    batch_size: int = 32,
    device: str = "cpu",
    export_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Prune the student of a bundle, optionally fine-tune it on ``data``, and write a new bundle.

    With ``data`` (an image folder with train/val sub-folders, or anything `training.evaluate`'s
    dataset loader accepts) the new bundle is fully re-evaluated (metrics, calibration, OOD, INT8);
    without it the bundle keeps the old manifest fields that do not depend on the weights and drops
    the stale metrics, calibration and OOD statistics, saying so in ``training["pruning"]``.
    ``export_options`` are passed on to `training.export.export_bundle` (e.g. ``complexity=False``).
    ``progress`` receives one human-readable line per step (the CLI prints them as they come).
    """
    say = progress or (lambda _msg: None)
    from kdviewer.models.bundle import open_bundle
    from training.complexity import count_flops, count_params
    from training.export import write_minimal_bundle

    out = Path(out)
    say(f"opening {bundle_path}")
    with open_bundle(bundle_path) as b:
        m = b.manifest
        student = _build_student(b)
        say(f"pruning {m.student.architecture}: {ratio:.0%} of the internal channels (smallest L1 norm)")
        before = {
            "params": count_params(student),
            "gflops": count_flops(student, m.preprocessing.input_size, m.preprocessing.channels) / 1e9,
        }
        pruned = prune_model(student, ratio)
        after = {
            "params": count_params(pruned),
            "gflops": count_flops(pruned, m.preprocessing.input_size, m.preprocessing.channels) / 1e9,
        }
        info: dict[str, Any] = {
            "ratio": ratio,
            "method": "L1 structured (filters)",
            "before": before,
            "after": after,
            "source_bundle": m.name,
            "finetune_epochs": finetune_epochs,
        }
        log.info("pruned %s: params %d -> %d", m.student.architecture, before["params"], after["params"])
        say(f"params {before['params']:,} -> {after['params']:,}")
        if data is None:
            if finetune_epochs:
                raise ValueError("--finetune-epochs needs --data")
            say("writing the bundle (no --data: metrics, calibration and OOD statistics are dropped)")
            return write_minimal_bundle(b, pruned, out, pruning=info)
        from training.evaluate import dataset_loaders

        say(f"reading {data}")
        loaders = dataset_loaders(data, m, batch_size=batch_size)
        history: list[dict] = []
        if finetune_epochs:
            history = finetune(pruned, loaders["train"], finetune_epochs, task=m.task, lr=lr, device=device,
                               progress=say)
        from training.export import export_bundle

        teacher = b.build_torch("teacher") if b.has_teacher else None
        config = dict(m.training.get("config", {})) if isinstance(m.training.get("config"), dict) else {}
        config["pruning"] = info
        say("re-evaluating and exporting (metrics, calibration, INT8, OOD, report)")
        return export_bundle(
            out,
            name=f"{m.name}-pruned{round(ratio * 100)}",
            task=m.task,
            class_names=list(m.class_names),
            preprocessing=m.preprocessing,
            student=pruned,
            student_arch=m.student.architecture,
            teacher=teacher,
            teacher_arch=m.teacher.architecture if m.teacher is not None else None,
            train_loader=loaders["train"],
            val_loader=loaders["val"],
            test_loader=loaders.get("test"),
            config=config,
            history=history,
            data_fingerprint=str(m.training.get("data_fingerprint", "")),
            demo=m.demo,
            synthetic=m.synthetic_data,
            device=device,
            positive_class=m.positive_class,
            modality=list(m.modality),
            progress=lambda phase: say(f"  export: {phase}"),
            # the pruned student keeps the INT8 mixed precision of the bundle it came from
            **{"int8_fp32_through": m.training.get("int8_fp32_through"), **(export_options or {})},
        )


def _build_student(bundle: Any) -> nn.Module:
    """The bundle's student as a torch model, honouring a previous pruning's channel config."""
    from kdviewer.models.architectures import SPECS, build_model

    m = bundle.manifest
    channels = m.training.get("pruned_channels") if isinstance(m.training, dict) else None
    if not channels:
        return bundle.build_torch("student")
    state = bundle.load_state_dict(m.student.weights)
    head = SPECS[m.student.architecture].head
    dropout = 0.5 if f"{head}.1.weight" in state else 0.0
    model = build_model(m.student.architecture, m.num_classes, m.preprocessing.channels, dropout)
    apply_channel_config(model, channels)
    model.load_state_dict(state, strict=True)
    return model.eval()


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``kd-train prune BUNDLE --ratio R --out DIR [--finetune-epochs N --data DIR]``."""
    p = subparsers.add_parser(
        "prune",
        help="L1 structured pruning of a bundle's student (channels really removed), optional fine-tune",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("bundle", help="model bundle folder or .zip")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of internal channels to remove")
    p.add_argument("--out", required=True, help="folder to write the pruned bundle to")
    p.add_argument(
        "--data",
        default=None,
        help="dataset (image folder with train/val, or CSV) for fine-tuning and re-evaluation",
    )
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cli)
    return p


def comparison_table(before: Any, after: Any) -> list[str]:
    """Before/after lines for the source and the pruned bundle's manifests: params, GFLOPs (as measured
    by the pruning) and every metric both bundles report."""
    t = after.training if isinstance(after.training, dict) else {}
    info = t.get("pruning") or (t.get("config") or {}).get("pruning") or {}
    b_info, a_info = info.get("before", {}), info.get("after", {})
    rows: list[tuple[str, Any, Any]] = [
        ("params", b_info.get("params", before.student.params), a_info.get("params", after.student.params)),
        ("GFLOPs", b_info.get("gflops", before.student.gflops), a_info.get("gflops", after.student.gflops)),
    ]
    rows += [(k, before.metrics[k].value, after.metrics[k].value)
             for k in sorted(set(before.metrics) & set(after.metrics))]
    lines = [f"{'':<16}{'before':>14}{'after':>14}{'change':>10}"]
    for name, a, b in rows:
        fmt = ",.0f" if name == "params" else ".3f"
        cells = ["-" if v is None else format(float(v), fmt) for v in (a, b)]
        change = ""
        if a is not None and b is not None:
            change = f"{(b - a) / a:+.1%}" if name in ("params", "GFLOPs") and a else f"{b - a:+.3f}"
        lines.append(f"{name:<16}{cells[0]:>14}{cells[1]:>14}{change:>10}")
    if before.metrics and not after.metrics:
        lines.append("(metrics not re-evaluated: pass --data to fine-tune and re-evaluate)")
    return lines


def _cli(args: argparse.Namespace) -> int:
    import sys
    import time

    from kdviewer.models.bundle import open_bundle

    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    path = prune_bundle(
        args.bundle,
        args.ratio,
        args.out,
        data=args.data,
        finetune_epochs=args.finetune_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=args.device,
        progress=say,
    )
    with open_bundle(args.bundle) as b0, open_bundle(path) as b1:
        for line in comparison_table(b0.manifest, b1.manifest):
            print(line)
    print(f"pruned bundle written to {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover - debugging aid
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(prog="kd-train")
    add_cli(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    raise SystemExit(ns.func(ns))


__all__ = [
    "add_cli",
    "apply_channel_config",
    "channel_config",
    "expected_param_fraction",
    "finetune",
    "prunable_pairs",
    "prune_bundle",
    "prune_model",
]
