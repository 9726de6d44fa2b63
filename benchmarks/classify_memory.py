"""Peak memory of a whole ``kdviewer classify`` over a folder of cap-size images (issue 17, item 4).

Writes ``--n`` RLE-compressed RGB DICOMs, each as large as the decode-memory cap allows (the hostile
case of the issue: small files that decode to hundreds of MB, colour, so every copy of the samples
counts), runs ``python -m kdviewer.cli classify`` on them with the default two decoder processes, and
samples every 50 ms the resident memory (RSS) of the classify process *and all its descendants*
(decoders, resource tracker) from /proc. Prints the peak of that sum, the single largest process, and
the ratio of the peak to the 2.5 GB bound (last line ``RESULT ...``); exits 1 above the bound.

    python benchmarks/classify_memory.py [--n 3] [--model BUNDLE] [--workers 2] [--keep DIR] [--code DIR]

``--code`` runs another checkout's classify on the same files (e.g. the commit before issue 17: its
pixel caps let these files decode with every float copy, for the before/after ratio).

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BOUND_BYTES = 2.5e9
ROOT = Path(__file__).resolve().parents[1]


def cap_side(samples: int = 3) -> int:
    """Largest square side whose decode fits `MAX_DECODE_BYTES` (the file itself counted at ~1/20)."""
    from kdviewer.imaging.formats import MAX_DECODE_BYTES, decode_bytes

    side = int(math.sqrt(MAX_DECODE_BYTES / (samples + 8)))
    while decode_bytes(side * side, samples, 1, side * side * samples // 20) > MAX_DECODE_BYTES:
        side -= 16
    return side


def write_rgb_rle(path: Path, side: int, seed: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    base = ((x // 48 + y // 48) % 7 * 30).astype(np.uint8)  # blocks: runs that RLE compresses well
    arr = np.stack([base, np.roll(base, int(rng.integers(1, 40)), 1), base[::-1]], axis=-1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [pid], [pid]
    while frontier:
        nxt = [c for c, p in parents.items() if p in frontier]
        out += nxt
        frontier = nxt
    return out


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="number of cap-size images (default 3)")
    ap.add_argument("--model", default=None, help="bundle (default: the demo bundle)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write the images into this folder and keep them")
    ap.add_argument("--code", default=str(ROOT),
                    help="checkout whose kdviewer runs the classify (e.g. an older one, to compare)")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kdviewer-mem-"))
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    side = cap_side()
    from kdviewer.imaging.formats import MAX_DECODE_BYTES, decode_bytes

    t0 = time.perf_counter()
    for i in range(args.n):
        p = folder / f"rgb_rle_{i}.dcm"
        if not p.exists():
            write_rgb_rle(p, side, i)
    sizes = [p.stat().st_size for p in sorted(folder.iterdir())]
    need = decode_bytes(side * side, 3, 1, sizes[0])
    print(f"{args.n} RLE RGB DICOMs of {side} x {side} ({side * side / 1e6:.1f} Mpixel, "
          f"{sizes[0] / 1e6:.1f} MB each; decode estimate {need / 2**20:.0f} MiB of the "
          f"{MAX_DECODE_BYTES / 2**20:.0f} MiB cap), written in {time.perf_counter() - t0:.1f} s")

    out = work / "results.csv"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kdviewer.cli", "classify", str(folder), "-o", str(out), "--no-progress",
           "--workers", str(args.workers)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": args.code}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak_sum, peak_one, peak_procs = 0, 0, 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        rss = [_rss(p) for p in pids]
        total = sum(rss)
        if total > peak_sum:
            peak_sum, peak_procs = total, len([r for r in rss if r])
        peak_one = max(peak_one, max(rss, default=0))
        time.sleep(0.05)
    output = proc.stdout.read() if proc.stdout else ""
    wall = time.perf_counter() - t0
    print(output.strip())
    print(f"classify exit code {proc.returncode} in {wall:.1f} s")
    print(f"peak RSS of the process tree: {peak_sum / 1e9:.2f} GB ({peak_procs} processes); "
          f"largest single process {peak_one / 1e9:.2f} GB")
    print(f"bound 2.50 GB: peak / bound = {peak_sum / BOUND_BYTES:.2f}")
    ok = proc.returncode == 0 and peak_sum < BOUND_BYTES
    print("OK: under the bound" if ok else "FAIL: above the bound")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT classify_memory_peak_over_bound {peak_sum / BOUND_BYTES:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
