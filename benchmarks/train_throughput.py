"""KD training throughput: the engine vs a plain PyTorch KD loop, same data, same models, same run.

Seed-002 style distillation (ResNet-34 teacher -> ResNet-18 student, Hinton KD T=4 alpha=0.7, Adam 1e-3,
weight decay 1e-5) on synthetic chest phantoms at a small input size so it runs in minutes on a CPU.

1. A ResNet-34 teacher is fine-tuned once (by the engine) and saved; both KD runs distil from it.
2. Engine: ``training.engine.run`` with that teacher (``teacher.weights: <file>``, 0 fine-tune epochs):
   decode + preprocess once into an in-memory cache, frozen-teacher outputs computed once and reused
   every epoch (no augmentation), bf16 autocast + channels_last where the CPU has AMX (``amp: auto``).
3. Plain loop: the textbook version — ``PIL.Image.open`` + torchvision transforms per item every epoch,
   a ``DataLoader``, the teacher forward at every step, fp32.

Both include per-epoch validation and every one-off cost (decoding, teacher caching) in their time;
images/s = training images x epochs / wall time. The last line is ``RESULT train_speedup <ratio>``.

    python benchmarks/train_throughput.py [--images 600] [--size 64] [--epochs 6] [--teacher-epochs 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdviewer.events import EventWriter  # noqa: E402
from kdviewer.models.architectures import build_model  # noqa: E402
from training.config import config_from_dict  # noqa: E402
from training.data import discover  # noqa: E402
from training.engine import run  # noqa: E402


def make_data(out: Path, n: int, seed: int) -> Path:
    from training.synth import generate

    return Path(generate("cxr", n, out, fmt="png", seed=seed, size=256, difficulty=0.5))


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


def plain_kd(splits, teacher_state: dict, args) -> dict:
    torch.manual_seed(0)
    k = len(splits.class_names)
    teacher = build_model("resnet34", k, 1)
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    student = build_model("resnet18", k, 1)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    train = DataLoader(
        PlainImages(splits.train, args.size), batch_size=args.batch, shuffle=True, num_workers=0
    )
    val = DataLoader(PlainImages(splits.val, args.size), batch_size=2 * args.batch, num_workers=0)
    T, alpha = 4.0, 0.7
    best = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        student.train()
        for x, y in train:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
            loss = alpha * T * T * kd + (1 - alpha) * F.cross_entropy(s_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        student.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((student(x).argmax(1) == y).sum())
                total += len(y)
        best = max(best, correct / total)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(splits.train) * args.epochs
    return {"seconds": elapsed, "images_per_s": n / elapsed, "cpu_s": cpu, "val_accuracy": best}


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
        "runtime": {"device": "cpu", "amp": args.amp, "seed": 0},
        "output": {"dir": str(out), "export": False},
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory(prefix="kdv-bench-") as tmp_:
        tmp = Path(tmp_)
        t = time.perf_counter()
        data = make_data(tmp / "data", args.images, seed=0)
        print(f"data: {args.images} synthetic phantoms in {time.perf_counter() - t:.1f} s", flush=True)

        # 1. the shared teacher (fine-tuned once, by the engine, as a plain supervised run)
        t = time.perf_counter()
        teacher_run = run(
            config_from_dict(
                engine_cfg(
                    data,
                    tmp / "teacher",
                    args,
                    student={"arch": "resnet34"},
                    optim={
                        "name": "adam",
                        "lr": 1e-3,
                        "weight_decay": 1e-5,
                        "batch_size": args.batch,
                        "epochs": args.teacher_epochs,
                    },
                )
            ),
            EventWriter("teacher", [_Sink()]),
        )
        teacher_state = {
            k: v.detach().float().contiguous() for k, v in teacher_run.student.state_dict().items()
        }
        torch.save(teacher_state, tmp / "teacher.pt")
        t_acc = teacher_run.history[-1]["val"]["accuracy"]
        print(
            f"teacher ResNet-34: {time.perf_counter() - t:.1f} s, best val accuracy "
            f"{max(h['val']['accuracy'] for h in teacher_run.history):.3f} (last {t_acc:.3f})",
            flush=True,
        )

        # 2. engine KD
        cfg = engine_cfg(
            data,
            tmp / "engine",
            args,
            teacher={"arch": "resnet34", "weights": str(tmp / "teacher.pt"), "epochs": 0},
            kd={"methods": [{"name": "hinton", "T": 4, "alpha": 0.7}]},
        )
        sink = _Sink()
        t, c = time.perf_counter(), time.process_time()
        result = run(config_from_dict(cfg), EventWriter("engine", [sink]))
        e_secs, e_cpu = time.perf_counter() - t, time.process_time() - c
        splits = discover(config_from_dict(cfg).data, seed=0)
        e_ips = len(splits.train) * args.epochs / e_secs
        e_acc = max(h["val"]["accuracy"] for h in result.history if h["stage"] == "student")
        amp = next((line for line in sink.lines if '"run_start"' in line), "")
        amp = "bf16" if '"amp":"bfloat16"' in amp else "off"
        print(
            f"engine KD: {e_secs:.1f} s, {e_ips:.1f} images/s, best val accuracy {e_acc:.3f} (amp {amp})",
            flush=True,
        )

        # 3. plain loop
        p = plain_kd(splits, teacher_state, args)
        print(
            f"plain KD loop: {p['seconds']:.1f} s, {p['images_per_s']:.1f} images/s, "
            f"best val accuracy {p['val_accuracy']:.3f}",
            flush=True,
        )

    speedup = e_ips / p["images_per_s"]
    print(
        f"train images {len(splits.train)}, val {len(splits.val)}, {args.size} px, {args.epochs} epochs, "
        f"batch {args.batch}, threads {torch.get_num_threads()}"
    )
    print(
        f"CPU seconds (all threads): engine {e_cpu:.1f} vs plain {p['cpu_s']:.1f} "
        f"(ratio {p['cpu_s'] / max(e_cpu, 1e-9):.2f}; less sensitive to other load on the machine)"
    )
    print(
        f"val accuracy engine {e_acc:.3f} vs plain {p['val_accuracy']:.3f} "
        f"(difference {e_acc - p['val_accuracy']:+.3f})"
    )
    print(f"RESULT train_speedup {speedup:.2f}")
    if not math.isfinite(speedup):
        sys.exit(1)


if __name__ == "__main__":
    main()
