"""Experiment (issue 11): does a short quantization-aware fine-tune let the Kermany Lite0 student pass
the exporter's INT8 parity bar (ORT static QDQ, per-channel U8S8, MinMax on 64 training images; max |dp|
<= 0.1 at the manifest temperature) on the whole val split?

    python scripts/int8_qat_probe.py --baseline --steps 0       # the shipped student as it is
    python scripts/int8_qat_probe.py --steps 260 --lr 1e-4      # ~22 min on 2 cores

Fine-tune: every conv with its batch norm folded (frozen statistics, as ORT's pre-processing folds them),
the folded weight fake-quantized per output channel (int8, symmetric) and the conv's input and output per
tensor (uint8, moving min/max, frozen half-way), loss = KL to the fp32 student's own outputs + 0.1 x
cross-entropy, AdamW on all layers, batch 32. Then the plain network is exported and quantized exactly as
the exporter does, and INT8 is compared with its own fp32 on all val images (T = 1 and the shipped
bundle's T = 1.9). Residual additions are not fake-quantized (ORT quantizes them). Not part of any
recipe: it measures whether quantization-aware training is the way to an INT8 default model.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdviewer.models.efficientnet_lite import ConvBNAct
from kdviewer.models.onnx_export import export_onnx, ort_session
from training.calibration import probabilities
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.data import BatchLoader, build_datasets, discover
from training.evaluate import evaluate_onnx
from training.quantize import calibration_images, quantize_onnx
from training.zoo import create_model

SHIPPED_T = 1.9  # resources/models/kermany_cxr: the calibration temperature the parity check uses
CLASSES = ["NORMAL", "PNEUMONIA"]
# the run the shipped bundle came from
SHIPPED_CHECKPOINT = "runs/kermany_cxr/ablation/hinton-s0/checkpoints/best_student.pt"


class FakeQuant:
    """Per-tensor uint8 asymmetric fake quantization, range from a moving min/max (0 always inside)."""

    enabled = False

    def __init__(self) -> None:
        self.lo: float | None = None
        self.hi: float | None = None
        self.frozen = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if self.lo is None or self.hi is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo, self.hi = 0.9 * self.lo + 0.1 * lo, 0.9 * self.hi + 0.1 * hi
        if not FakeQuant.enabled:
            return x
        lo, hi = min(self.lo or 0.0, 0.0), max(self.hi or 0.0, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = min(max(round(-lo / scale), 0), 255)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class QConvBN(nn.Module):
    """conv + frozen-statistics BN folded, the folded weight fake-quantized per output channel (int8),
    input and output fake-quantized per tensor (uint8)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        self.q_in, self.q_out = FakeQuant(), FakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, conv = self.bn, self.conv
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = conv.weight * inv.reshape(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * inv
        if FakeQuant.enabled:
            scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
            zero = torch.zeros_like(scale, dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
        y = F.conv2d(self.q_in(x), w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.q_out(y)


def wrap(model: nn.Module) -> nn.Module:
    """Every ConvBNAct's conv + BN -> QConvBN (the BN slot becomes an Identity)."""
    for mod in model.modules():
        if isinstance(mod, ConvBNAct):
            names = [n for n, _ in mod.named_children()]
            i = next(i for i, n in enumerate(names) if isinstance(getattr(mod, n), nn.Conv2d))
            setattr(mod, names[i], QConvBN(getattr(mod, names[i]), getattr(mod, names[i + 1])))
            setattr(mod, names[i + 1], nn.Identity())
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network again, with the fine-tuned conv and BN parameters."""
    for mod in model.modules():
        if isinstance(mod, ConvBNAct):
            names = [n for n, _ in mod.named_children()]
            for i, n in enumerate(names):
                q = getattr(mod, n)
                if isinstance(q, QConvBN):
                    setattr(mod, n, q.conv)
                    setattr(mod, names[i + 1], q.bn)
    return model


def kermany_student(checkpoint: str = SHIPPED_CHECKPOINT) -> tuple[nn.Module, dict[str, Any]]:
    """The Kermany Lite0 student (eval mode) and the recipe's datasets (same patient-wise split)."""
    cfg = load_config("training/recipes/kermany_cxr.yaml")
    seed = cfg.data.seed if cfg.data.seed is not None else cfg.runtime.seed
    splits = discover(cfg.data, cfg.task, seed)
    sets = build_datasets(splits, cfg.preprocessing.to_manifest(), cfg.data)
    student = create_model("efficientnet_lite0", 2, 1, 0.2, role="student")
    student.load_state_dict(load_checkpoint(checkpoint))
    return student.eval(), sets


def int8_report(model: nn.Module, tag: str, train_eval: BatchLoader, val: BatchLoader, tmp: str) -> None:
    from sklearn.metrics import roc_auc_score

    model.eval()
    fp32 = export_onnx(model, f"{tmp}/{tag}.onnx", 1, 224)
    int8 = quantize_onnx(fp32, f"{tmp}/{tag}.int8.onnx", calibration_images(train_eval, 64))
    r32 = evaluate_onnx(ort_session(fp32, 2), val, CLASSES)
    r8 = evaluate_onnx(ort_session(int8, 2), val, CLASSES)
    y = r32["targets"]
    d_logit = float(np.abs(r8["logits"] - r32["logits"]).max())
    for t in (1.0, SHIPPED_T):
        p8, p32 = (probabilities(r["logits"], "single-label", t)[:, 1] for r in (r8, r32))
        d = np.abs(p8 - p32)
        print(f"{tag} T={t}: max|dp| {d.max():.3f}, cases |dp| > 0.1: {(d > 0.1).sum()}, > 0.05: "
              f"{(d > 0.05).sum()} (max |dlogit| {d_logit:.3f})", flush=True)
    agree = float((r8["probs"].argmax(1) == r32["probs"].argmax(1)).mean())
    for name, r in (("fp32", r32), ("int8", r8)):
        acc = float((r["probs"].argmax(1) == y).mean())
        print(f"{tag} {name}: ACC {acc:.4f} AUC {roc_auc_score(y, r['probs'][:, 1]):.4f}", flush=True)
    print(f"{tag}: label agreement {agree:.4f} on {len(y)} val images", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps (0: none)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--baseline", action="store_true", help="first report the student as it is")
    ap.add_argument("--checkpoint", default=SHIPPED_CHECKPOINT,
                    help="the student's weights (default: the run the shipped bundle came from)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp()
    student, sets = kermany_student(args.checkpoint)
    train = BatchLoader(sets["train"], 32, shuffle=True, seed=0)
    train_eval, val = BatchLoader(sets["train"], 64), BatchLoader(sets["val"], 128)
    if args.baseline:
        int8_report(student, "baseline", train_eval, val, tmp)
    if args.steps <= 0:
        return
    ref = copy.deepcopy(student).eval().requires_grad_(False)
    q = wrap(student).eval().requires_grad_(True)  # eval: BN statistics frozen, dropout off
    with torch.no_grad():  # the first ranges from 64 training images, as ORT calibrates
        q(next(iter(train_eval))[0])
    FakeQuant.enabled = True
    opt = torch.optim.AdamW(q.parameters(), lr=args.lr, weight_decay=0.0)
    t0, step = time.time(), 0
    while step < args.steps:
        for x, y in train:
            with torch.no_grad():
                target = F.softmax(ref(x), 1)
            out = q(x)
            loss = F.kl_div(F.log_softmax(out, 1), target, reduction="batchmean")
            loss = loss + 0.1 * F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
            if step == args.steps // 2:
                for m in q.modules():
                    if isinstance(m, QConvBN):
                        m.q_in.frozen = m.q_out.frozen = True
            if step >= args.steps:
                break
    FakeQuant.enabled = False
    int8_report(unwrap(q).eval(), f"qat{args.steps}", train_eval, val, tmp)


if __name__ == "__main__":
    main()
