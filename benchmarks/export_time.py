"""Export time of recipe 000 (ResNet-50 -> ResNet-18, 224 px, 64 phantoms): this tree vs an older one.

1. Trains recipe 000 briefly once (teacher as built, 1 student epoch, ``output.export: false``) into
   ``--work``; both exports below start from copies of that run, so they export the same weights.
2. New: ``kd-train export RUN`` with this tree (the export stage, its events and substage timings).
3. Old (``--ref``, default: f53ffc4, main before the export stage): the same run exported by that commit's
   engine (``git archive`` of its ``training/`` and ``kdviewer/``), via ``run --resume`` on the
   finished training with ``output.export: true``.

Both are timed the same way, from the engine's "data: ..." log line (data loaded, models next) to
``run_end``: checkpoint loading, the export and the eval events. The per-substage seconds (new: the
``stage_end`` event; old: ``manifest.training.export_timings_s``, coarser phases, report not timed) and
the load average (``os.getloadavg``) before and after are printed, so a reader can judge a busy
machine, with the CPU seconds of each whole process (imports and data loading included), which a
busy machine inflates far less than wall time.

4. In a run (the issue's measure, unless ``--no-in-run``): recipe 000 run whole with this tree, export on;
   ``RESULT export_in_run_s`` is the time from the last ``epoch_end`` to ``run_end``. ``kd-train export``
   (2.) also loads the checkpoints and imports the export's modules (~1.5 s), which a run has done already.

Last line: ``RESULT export_speedup <old / new>`` (or ``RESULT export_s <new>`` with ``--ref none``).

    python benchmarks/export_time.py [--n 64] [--work DIR] [--ref REF|none] [--threads N] [--no-in-run]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            out.append(ev)
    return out


def _span(events: list[dict]) -> float:
    """Seconds from the last "data: ..." log line to ``run_end``."""
    start = [
        e["time"] for e in events if e["event"] == "log" and str(e.get("message", "")).startswith("data:")
    ]
    end = [e["time"] for e in events if e["event"] == "run_end"]
    if not start or not end:
        raise RuntimeError("the run did not finish: " + json.dumps(events[-3:])[:2000])
    return end[-1] - start[-1]


#: main before the export became a stage (issue 12): the engine the issue's 26 s was measured on
PRE_STAGE_ENGINE = "f53ffc4"


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _engine(tree: Path, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "training", *args, "--events", str(log)],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kd-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _for_old_tree(config: Path, tree: Path) -> None:
    """Drop from the run's ``config.yaml`` the settings the old tree does not know (added since, written at
    their defaults, e.g. ``data.drop_labels``), as its ``check`` names them, so that it can resume the run."""
    import yaml

    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", "training", "check", str(config)], cwd=tree, env=env,
                          capture_output=True, text=True)
    unknown = re.findall(r"^([\w.]+): unknown setting", proc.stdout + proc.stderr, flags=re.M)
    if not unknown:
        return
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    for dotted in unknown:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key) or {}
        node.pop(leaf, None)
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    print(f"  (settings unknown to the old tree left out of its config: {', '.join(unknown)})", flush=True)


def _timings(run: Path) -> dict:
    manifest = json.loads((run / "bundle" / "manifest.json").read_text(encoding="utf-8"))
    return manifest["training"].get("export_timings_s") or {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="phantoms (70:30 split)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (kept; default: a temp folder)")
    ap.add_argument("--ref", default=PRE_STAGE_ENGINE,
                    help="git ref of the old engine ('merge-base': of HEAD and main), or 'none'")
    ap.add_argument("--threads", type=int, default=None, help="runtime.threads for both (default: unset)")
    ap.add_argument("--no-in-run", dest="in_run", action="store_false",
                    help="skip the third measurement: a whole run of this tree, last epoch_end -> run_end")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    trained = work / "trained"
    sets = ["--set", f"data.root={work / 'data'}", "--set", f"data.generate.n={args.n}"]
    if args.threads:
        sets += ["--set", f"runtime.threads={args.threads}"]
    if not (trained / "checkpoints" / "last.pt").is_file():
        print(f"training recipe 000 once ({args.n} phantoms, 1 student epoch) into {trained} ...", flush=True)
        once = ["--set", "teacher.epochs=0", "--set", "optim.epochs=1", "--set", "output.export=false"]
        _engine(ROOT, ["run", "000", *sets, *once, "--set", f"output.dir={trained}"], work / "train.jsonl")

    results: dict[str, float] = {}
    timings: dict[str, dict] = {}
    order = ["new"]
    old_tree = None
    if args.ref != "none":
        ref = args.ref
        if ref == "merge-base":
            ref = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or "main"
        old_tree = work / f"old-{ref[:12]}"
        if not old_tree.is_dir():
            old_tree.mkdir()
            archive = subprocess.run(["git", "archive", ref, "training", "kdviewer"], cwd=ROOT,
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        order = ["old", "new"]
        print(f"old engine: {ref}", flush=True)
    for name in order:
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)
        skip = shutil.ignore_patterns("bundle", "events.jsonl", "finished.json")
        shutil.copytree(trained, run, ignore=skip)
        log = work / f"{name}.jsonl"
        log.unlink(missing_ok=True)
        if name == "old":
            assert old_tree is not None
            _for_old_tree(run / "config.yaml", old_tree)  # (not timed)
        before = _load()
        t0, cpu0 = time.time(), _children_cpu_s()
        if name == "new":
            _engine(ROOT, ["export", str(run)], log)
        else:
            assert old_tree is not None
            _engine(old_tree, ["run", str(run / "config.yaml"), "--resume", "--set", "output.export=true",
                               "--set", f"output.dir={run}"], log)
        wall, cpu = time.time() - t0, _children_cpu_s() - cpu0
        events = _events(log)
        results[name] = _span(events)
        stage_end = [e for e in events if e["event"] == "stage_end" and e.get("stage") == "export"]
        # the export stage's own timings (report included); the old engine: its manifest's phases
        timings[name] = stage_end[-1].get("timings") if stage_end else _timings(run)
        print(f"{name}: export {results[name]:.1f} s (data loaded -> run_end; process {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU); load {before} -> {_load()}", flush=True)
        if stage_end:
            took = stage_end[-1]["elapsed_s"]
            print(f"  export stage (stage_start -> stage_end): {took:.1f} s", flush=True)
        print("  substages: " + ", ".join(f"{k} {v:.1f}" for k, v in timings[name].items()), flush=True)
    if args.in_run:
        # The issue's own measure: inside a whole run (this tree), from the last training epoch to run_end —
        # what a user waits for after training; modules the export needs are already imported there.
        run = work / "run-in-run"
        shutil.rmtree(run, ignore_errors=True)
        log = work / "in-run.jsonl"
        log.unlink(missing_ok=True)
        before = _load()
        once = ["--set", "teacher.epochs=0", "--set", "optim.epochs=1"]
        _engine(ROOT, ["run", "000", *sets, *once, "--set", f"output.dir={run}"], log)
        events = _events(log)
        last_epoch = max(e["time"] for e in events if e["event"] == "epoch_end")
        run_end = max(e["time"] for e in events if e["event"] == "run_end")
        took = run_end - last_epoch
        print(f"in a run (this tree): last epoch_end -> run_end {took:.1f} s; load {before} -> {_load()}",
              flush=True)
        print(f"RESULT export_in_run_s {took:.1f}")
    if "old" in results:
        print(f"RESULT export_speedup {results['old'] / results['new']:.2f}")
    else:
        print(f"RESULT export_s {results['new']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
