"""KD training throughput: the engine vs a plain PyTorch KD loop, same data, same models, same run.

Seed-002 style distillation (ResNet-34 teacher -> ResNet-18 student, Hinton KD T=4 alpha=0.7, Adam 1e-3,
weight decay 1e-5) on synthetic chest phantoms at 128 px input (the papers use 224 px; 128 px keeps the
run to minutes on a CPU).

1. A ResNet-34 teacher is fine-tuned once (by the engine) and saved; both KD runs distil from it.
2. Engine: ``training.engine.run`` with that teacher (``teacher.weights: <file>``, 0 fine-tune epochs):
   decode + preprocess once into an in-memory cache, frozen-teacher outputs computed once and reused
   every epoch (no augmentation), checkpoints written in the background; ``amp: auto`` picks bf16
   autocast + channels_last where a timed probe of the student finds it faster (``training.amp``; its
   measurement is printed; ``--amp off`` forces fp32 to see what the caching alone buys).
3. Plain loop: the textbook version — ``PIL.Image.open`` + torchvision transforms per item every epoch,
   a ``DataLoader`` (no workers: on 2 cores they would only compete with the compute threads), the
   teacher forward at every step, fp32, no checkpoints.

``--device cuda``: the same comparison on a GPU, against the plain loop written the way users write it
there — a ``DataLoader`` with worker processes (``--workers``, default min(8, cores)) and pinned memory,
``non_blocking`` copies, bf16 autocast (fp16 + ``GradScaler`` on GPUs without bf16), the teacher forward
at every step; the engine runs with ``runtime.device: cuda`` (amp auto: bf16, channels_last) and the same
number of decoding workers. Defaults there: 224 px, batch 64 (the papers' setting). Goal >= 1.5x at equal
accuracy (the accuracy and AUC of both are printed beside the ratio).

The phantoms are rendered at 256 px and stored at 1024 px (``--store-size``), the size of a typical
digitised chest radiograph, so per-item decoding costs what it does on real data.

Both include per-epoch validation and every one-off cost (decoding, teacher caching) in their time;
images/s = training images x epochs / wall time. The last line is ``RESULT train_speedup <ratio>``.

    python benchmarks/train_throughput.py [--images 600] [--epochs 8] [--teacher-epochs 10] [--repeats 1]
    python benchmarks/train_throughput.py --device cuda [--images 560] [--epochs 8] [--workers 8]

About 8 minutes on an idle 2-core CPU (600 phantoms: with fewer, the from-scratch ResNets barely learn
in 8 epochs at 128 px and the accuracy check says nothing). On a shared, busy machine use
``--repeats 2``: engine and plain loop then run in the order engine, plain, plain, engine so a drift in
the load between them cancels out (images/s are summed over both runs of each). Accuracy is reported as
best validation accuracy and AUC (the steadier "equal accuracy" check: batch-norm statistics make the
0.5-threshold accuracy of a from-scratch ResNet jumpy over a few dozen steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdviewer.events import EventWriter  # noqa: E402
from kdviewer.models.architectures import build_model  # noqa: E402
from training.config import config_from_dict  # noqa: E402
from training.data import discover  # noqa: E402
from training.engine import run  # noqa: E402


def make_data(out: Path, args: argparse.Namespace) -> Path:
    from training.synth import generate

    return Path(
        generate(
            "cxr", args.images, out, fmt="png", seed=0, size=args.source_size, difficulty=args.difficulty
        )
    )


# ------------------------------------------------------------------------------------------ plain loop


class PlainImages(Dataset):
    def __init__(self, samples, size: int) -> None:
        from torchvision import transforms as T

        self.samples = samples
        self.tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize([0.5], [0.25])])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        with Image.open(s.path) as im:
            x = self.tf(im.convert("L"))
        return x, s.target


def _plain_amp(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # the textbook CPU loop: fp32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def plain_kd(splits, teacher_state: dict, args) -> dict:
    """The KD loop as users write it: per-item decode + transforms in a DataLoader, teacher every step.

    CPU: no workers (on 2 cores they only compete with the compute threads), fp32. CUDA: ``--workers``
    worker processes, pinned memory, non_blocking copies, autocast (bf16, or fp16 with a GradScaler).
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    t0, c0 = time.perf_counter(), time.process_time()  # setup included, as for the engine
    torch.manual_seed(0)
    k = len(splits.class_names)
    teacher = build_model("resnet34", k, 1)
    teacher.load_state_dict(teacher_state)
    teacher.to(device).eval()
    student = build_model("resnet18", k, 1).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    dtype = _plain_amp(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    workers = args.workers if cuda else 0
    loader_kw = {"num_workers": workers, "pin_memory": cuda, "persistent_workers": workers > 0}
    train = DataLoader(PlainImages(splits.train, args.size), batch_size=args.batch, shuffle=True, **loader_kw)
    val = DataLoader(PlainImages(splits.val, args.size), batch_size=2 * args.batch, **loader_kw)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    T, alpha = 4.0, 0.7
    best = best_auc = 0.0
    for _ in range(args.epochs):
        student.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
            with autocast():
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
                kd = F.kl_div(
                    F.log_softmax(s_logits.float() / T, 1), F.softmax(t_logits.float() / T, 1),
                    reduction="batchmean",
                )
                loss = alpha * T * T * kd + (1 - alpha) * F.cross_entropy(s_logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        student.eval()
        probs, labels = [], []
        with torch.no_grad(), autocast():
            for x, y in val:
                logits = student(x.to(device, non_blocking=cuda)).float()
                probs.append(torch.softmax(logits, 1)[:, 1].cpu())
                labels.append(y)
        p, yv = torch.cat(probs).numpy(), torch.cat(labels).numpy()
        best = max(best, float(((p >= 0.5) == (yv == 1)).mean()))
        best_auc = max(best_auc, float(roc_auc_score(yv, p)))
    if cuda:
        torch.cuda.synchronize(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(splits.train) * args.epochs
    return {
        "seconds": elapsed,
        "images_per_s": n / elapsed,
        "cpu_s": cpu,
        "val_accuracy": best,
        "val_auc": best_auc,
        "amp": "off" if dtype is None else str(dtype).replace("torch.", ""),
    }


# -------------------------------------------------------------------------------------------- engine


def engine_cfg(data: Path, out: Path, args, **extra) -> dict:
    cfg = {
        "data": {"root": str(data), "split": "random", "val_fraction": 0.3, "cache": "on"},
        "preprocessing": {"input_size": args.size, "resize": args.size, "channels": 1},
        "student": {"arch": "resnet18"},
        "optim": {
            "name": "adam",
            "lr": 1e-3,
            "weight_decay": 1e-5,
            "batch_size": args.batch,
            "epochs": args.epochs,
            "schedule": {"name": "step", "step_size": 10, "gamma": 0.1},
        },
        "runtime": {
            "device": args.device,
            "amp": args.amp,
            "seed": 0,
            "num_workers": args.workers if args.device != "cpu" else 0,
        },
        "output": {"dir": str(out), "export": False, "bootstrap": 0},
    }
    cfg.update(extra)
    return cfg


class _Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def engine_kd(cfg: dict) -> dict:
    sink = _Sink()
    t, c = time.perf_counter(), time.process_time()
    result = run(config_from_dict(cfg), EventWriter("engine", [sink]))
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    acc = max(h["val"]["accuracy"] for h in result.history if h["stage"] == "student")
    auc = max(h["val"]["auc"] for h in result.history if h["stage"] == "student")
    start = next((json.loads(line) for line in sink.lines if '"run_start"' in line), {})
    notes = [json.loads(line).get("message", "") for line in sink.lines if '"amp auto' in line]
    return {
        "seconds": secs,
        "cpu_s": cpu,
        "val_accuracy": acc,
        "val_auc": auc,
        "amp": {"bfloat16": "bf16", "float16": "fp16"}.get(start.get("amp") or "", "off")
        + (" + channels_last" if start.get("channels_last") else ""),
        "amp_note": notes[0] if notes else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600, help="synthetic phantoms (70:30 train/val)")
    ap.add_argument("--source-size", type=int, default=256, help="phantom rendering side in pixels")
    ap.add_argument("--store-size", type=int, default=1024, help="stored PNG side (typical radiograph)")
    ap.add_argument("--difficulty", type=float, default=0.2)
    ap.add_argument("--size", type=int, default=None, help="model input side (default 128 CPU, 224 CUDA)")
    ap.add_argument("--epochs", type=int, default=8, help="KD epochs per measured run")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="default 32 CPU, 64 CUDA")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the plain loop and decoding workers of the engine on a GPU",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="1: engine, plain; 2: engine, plain, plain, engine"
    )
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not cuda:
        ap.error("--device: cpu or cuda[:N]")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device (torch.cuda.is_available() is False): run without --device cuda")
    args.size = args.size or (224 if cuda else 128)
    args.batch = args.batch or (64 if cuda else 32)
    if cuda:
        name = torch.cuda.get_device_name(torch.device(args.device))
        print(f"device {args.device}: {name}, torch {torch.__version__}, {args.workers} workers", flush=True)

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="kdv-bench-") as tmp_:
        tmp = Path(tmp_)
        t = time.perf_counter()
        data = make_data(tmp / "data", args)
        print(
            f"data: {args.images} synthetic phantoms ({args.source_size} px, stored at {args.store_size} px) "
            f"in {time.perf_counter() - t:.1f} s",
            flush=True,
        )

        # 1. the shared teacher (fine-tuned once, by the engine, as a plain supervised run)
        t = time.perf_counter()
        optim = {
            "name": "adam",
            "lr": 1e-3,
            "weight_decay": 1e-5,
            "batch_size": args.batch,
            "epochs": args.teacher_epochs,
        }
        teacher_cfg = engine_cfg(data, tmp / "teacher", args, student={"arch": "resnet34"}, optim=optim)
        teacher_run = run(config_from_dict(teacher_cfg), EventWriter("teacher", [_Sink()]))
        teacher_state = {
            k: v.detach().float().contiguous() for k, v in teacher_run.student.state_dict().items()
        }
        torch.save(teacher_state, tmp / "teacher.pt")
        t_best = max(h["val"]["accuracy"] for h in teacher_run.history)
        t_auc = max(h["val"]["auc"] for h in teacher_run.history)
        print(
            f"teacher ResNet-34: {time.perf_counter() - t:.1f} s, "
            f"best val accuracy {t_best:.3f}, AUC {t_auc:.3f}",
            flush=True,
        )

        # 2./3. engine KD and the plain loop, in the order engine, plain (, plain, engine): ABBA cancels a
        # steady drift of the machine's load, which on a shared CPU is larger than the effect measured.
        cfg = engine_cfg(
            data,
            tmp / "engine",
            args,
            teacher={"arch": "resnet34", "weights": str(tmp / "teacher.pt"), "epochs": 0},
            kd={"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}]},
        )
        splits = discover(config_from_dict(cfg).data, seed=0)
        order = ["engine", "plain"] + (["plain", "engine"] if args.repeats > 1 else [])
        runs: dict[str, list[dict]] = {"engine": [], "plain": []}
        for i, which in enumerate(order):
            if which == "engine":
                cfg["output"]["dir"] = str(tmp / f"engine-{i}")
                r = engine_kd(cfg)
            else:
                r = plain_kd(splits, teacher_state, args)
            runs[which].append(r)
            ips = len(splits.train) * args.epochs / r["seconds"]
            extra = f", amp {r['amp']}" + ("" if which == "engine" else ", PIL + torchvision per item")
            if r.get("amp_note"):
                print(f"  engine {r['amp_note']}", flush=True)
            print(
                f"{which:>6} KD: {r['seconds']:.1f} s, {ips:.1f} images/s, CPU {r['cpu_s']:.1f} s, "
                f"best val accuracy {r['val_accuracy']:.3f}, AUC {r['val_auc']:.3f}{extra}",
                flush=True,
            )

    n_images = len(splits.train) * args.epochs
    e_secs = sum(r["seconds"] for r in runs["engine"])
    p_secs = sum(r["seconds"] for r in runs["plain"])
    e_cpu = sum(r["cpu_s"] for r in runs["engine"])
    p_cpu = sum(r["cpu_s"] for r in runs["plain"])
    e_ips, p_ips = n_images * len(runs["engine"]) / e_secs, n_images * len(runs["plain"]) / p_secs
    e_acc, p_acc = runs["engine"][0]["val_accuracy"], runs["plain"][0]["val_accuracy"]
    e_auc, p_auc = runs["engine"][0]["val_auc"], runs["plain"][0]["val_auc"]
    speedup = e_ips / p_ips
    print(
        f"train images {len(splits.train)}, val {len(splits.val)}, {args.size} px input, "
        f"{args.epochs} KD epochs, "
        f"batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"order {' '.join(order)}"
    )
    print(f"engine {e_ips:.1f} images/s vs plain {p_ips:.1f} images/s (wall clock, one-off caching included)")
    print(f"CPU seconds: engine {e_cpu:.1f} vs plain {p_cpu:.1f} (ratio {p_cpu / max(e_cpu, 1e-9):.2f})")
    print(
        f"best val accuracy engine {e_acc:.3f} vs plain {p_acc:.3f} (difference {e_acc - p_acc:+.3f}); "
        f"best val AUC engine {e_auc:.3f} vs plain {p_auc:.3f} (difference {e_auc - p_auc:+.3f})"
    )
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average {load0:.1f} at the start, {load1:.1f} at the end, {os.cpu_count()} cores")
    print(f"RESULT train_speedup {speedup:.2f}")
    if not math.isfinite(speedup):
        sys.exit(1)


if __name__ == "__main__":
    main()
