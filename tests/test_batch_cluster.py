"""`kdviewer classify --cluster`: the Dask backend on a real LocalCluster (2 worker processes).

Rows identical to the local pool's (timings aside); a worker killed mid-run and a client killed and
rerun both end with every case exactly once; no Dask import without --cluster; clear errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _bundles import ct_volume, cxr_bundle, cxr_phantom, write_ct_series, write_dicom, write_png
from _classify import kill_after_rows, read_rows
from PIL import Image

from kdviewer.batch import BatchProgress, run_batch

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("t_decode_ms", "t_infer_ms")


def _by_path(path: Path) -> dict[str, dict[str, str]]:
    rows = read_rows(path)
    counts = Counter(r["path"] for r in rows)
    assert max(counts.values()) == 1, [p for p, c in counts.items() if c > 1]
    return {r["path"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (a killed one is restarted by its nanny), one thread each."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as lc:
        yield lc


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PNGs, a JPEG, a DICOM radiograph, a CT series (refused by the X-ray model), a corrupt DICOM."""
    root = tmp_path_factory.mktemp("cluster-mixed")
    rng = np.random.default_rng(5)
    for i in range(6):
        write_png(root / "png" / f"case{i}.png", cxr_phantom(rng, positive=bool(i % 2))[0])
    Image.fromarray(cxr_phantom(rng, True)[0]).save(root / "png" / "photo.jpg", quality=92)
    write_dicom(root / "dicom" / "cr1.dcm", cxr_phantom(rng, False)[0].astype(np.uint16) * 8)
    write_ct_series(root / "ct" / "series1", ct_volume(rng, n=4, size=64))
    good = (root / "dicom" / "cr1.dcm").read_bytes()
    (root / "dicom" / "corrupt.dcm").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not an image\n")
    return root


def _many(folder: Path, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    base = [cxr_phantom(rng, bool(i % 2))[0] for i in range(4)]
    for i in range(n):
        noisy = np.clip(base[i % 4] + rng.integers(0, 3, base[0].shape), 0, 255).astype(np.uint8)
        write_png(folder / f"{i:03d}.png", noisy)
    return [f"{i:03d}.png" for i in range(n)]


def test_cluster_rows_are_the_local_rows(cluster, mixed: Path, tmp_path: Path) -> None:
    bundle = cxr_bundle().path
    local = run_batch(mixed, bundle, tmp_path / "local.csv", workers=2, batch_size=4)
    seen: list[BatchProgress] = []
    dask = run_batch(mixed, bundle, tmp_path / "dask.csv", batch_size=4, cluster=cluster.scheduler_address,
                     progress=seen.append)
    a, b = _by_path(tmp_path / "local.csv"), _by_path(tmp_path / "dask.csv")
    assert len(a) == 10 and a == b  # every column but the timings, probabilities to the printed digit
    with open(tmp_path / "local.csv") as fa, open(tmp_path / "dask.csv") as fb:
        assert fa.readline() == fb.readline()  # the same header: the same schema
    assert (dask.processed, dask.errors, dask.refused, dask.label_counts) == (
        local.processed, local.errors, local.refused, local.label_counts)
    assert dask.skipped_files == local.skipped_files and dask.shift == local.shift
    assert seen and seen[-1].done == seen[-1].total == 10 and seen[-1].rate > 0 and seen[-1].errors == 1
    # resume on the cluster path too: nothing redone
    before = (tmp_path / "dask.csv").read_bytes()
    again = run_batch(mixed, bundle, tmp_path / "dask.csv", cluster=cluster.scheduler_address)
    assert again.processed == 0 and again.skipped == 10 and (tmp_path / "dask.csv").read_bytes() == before


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(cluster, tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    names = _many(folder, 40, seed=2)
    with distributed.Client(cluster.scheduler_address, timeout=30) as spy:
        pids = spy.run(os.getpid)  # {worker address: pid}
    killed: list[int] = []

    def progress(p: BatchProgress) -> None:
        if p.done >= 2 and not killed:  # rows are coming in: kill the worker that holds most work
            pid = next(iter(pids.values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "res.csv"
    s = run_batch(folder, cxr_bundle().path, out, batch_size=2, cluster=cluster.scheduler_address,
                  progress=progress)
    assert killed, "the run ended before a worker could be killed"
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == names  # every file, exactly once
    assert all(r["label"] and not r["error"] for r in rows)
    assert s.processed == 40 and s.errors == 0
    with distributed.Client(cluster.scheduler_address, timeout=30) as spy:
        spy.wait_for_workers(2, timeout=120)  # the nanny restarted it (for the other tests)
        assert killed[0] not in spy.run(os.getpid).values()


def test_a_killed_client_rerun_writes_each_case_once(cluster, tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    names = _many(folder, 40, seed=3)
    out = tmp_path / "res.csv"
    cmd = [sys.executable, "-m", "kdviewer.cli", "classify", str(folder), "-o", str(out),
           "--model", str(cxr_bundle().path), "--batch-size", "2", "--no-progress",
           "--cluster", cluster.scheduler_address]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc, rows_at_kill = kill_after_rows(cmd, out, env, deadline_s=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 2 <= rows_at_kill < 40
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already in res.csv" in done.stdout
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == names  # each file exactly once
    assert all(r["label"] and not r["error"] for r in rows)


def test_without_cluster_dask_is_never_imported(tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    write_png(folder / "a.png", cxr_phantom(np.random.default_rng(0), False)[0])
    code = (
        "import sys; from kdviewer.cli import main\n"
        f"rc = main(['classify', {str(folder)!r}, '-o', {str(tmp_path / 'r.csv')!r}, '--model', "
        f"{str(cxr_bundle().path)!r}, '--no-progress'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert rc == 0 and not bad, (rc, bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unreachable_scheduler_and_bad_spec_fail_fast(tmp_path: Path) -> None:
    from kdviewer.batch import Case
    from kdviewer.batch_cluster import ClusterConnection, ClusterError, cluster_results, parse_cluster

    assert parse_cluster("local:3").n_workers == 3
    assert parse_cluster("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    for bad in ("local:0", "local:x", "10.0.0.5:8786", "http://h:1"):
        with pytest.raises(ClusterError):
            parse_cluster(bad)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        unreachable = ClusterConnection(parse_cluster("tcp://127.0.0.1:9"), timeout=3)
        list(cluster_results(unreachable, [Case("x.png", "image", ("x.png",))], "bundle"))
    assert time.monotonic() - t0 < 30
    # the CLI: one line, exit 1, nothing written
    cmd = [sys.executable, "-m", "kdviewer.cli", "classify", str(tmp_path), "-o", str(tmp_path / "out.csv"),
           "--model", str(cxr_bundle().path), "--cluster", "local:zero"]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "local workers" in r.stderr and not (tmp_path / "out.csv").exists()


def test_local_cluster_workers_run_without_the_nanny_malloc_trim_setting(monkeypatch) -> None:
    """`--cluster local` starts one-slot workers without Dask's MALLOC_TRIM_THRESHOLD_ (which made every
    full-size frame a fresh mmap: ~45% more CPU per file), and the setting stays Dask's default outside."""
    import dask

    from kdviewer.batch_cluster import ClusterConnection, ClusterSpec

    key = "MALLOC_TRIM_THRESHOLD_"
    # a nanny also sets it in its own process, this one: the `cluster` fixture's left it here
    monkeypatch.delenv(key, raising=False)
    connection = ClusterConnection(ClusterSpec("local", n_workers=1))
    try:
        client = connection.client()
        env = client.run(lambda: os.environ.get(key))
        slots = [w["nthreads"] for w in client.scheduler_info()["workers"].values()]
    finally:
        connection.close()
    assert slots == [1] and list(env.values()) == [None]
    assert dask.config.get(f"distributed.nanny.pre-spawn-environ.{key}") is not None


def test_the_local_cluster_starts_beside_the_client_and_stops_with_the_run(tmp_path: Path) -> None:
    """`--cluster local` starts its workers while the client opens its bundle; when the run fails before
    classifying anything (here: no such bundle) or has nothing left to do, they are stopped, not leaked."""
    import psutil

    from kdviewer.batch_cluster import ClusterConnection, ClusterSpec
    from kdviewer.errors import BundleError

    def processes() -> set[int]:  # multiprocessing's resource tracker stays, by design
        return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())}

    before = processes()  # e.g. the `cluster` fixture's workers

    def workers_left() -> set[int]:
        return processes() - before

    connection = ClusterConnection(ClusterSpec("local", n_workers=1))
    assert connection._thread is not None and connection._thread.is_alive()  # started, not yet waited for
    assert connection.client().scheduler_info()["workers"]
    connection.close()
    connection.close()  # twice is harmless
    assert not workers_left()

    write_png(tmp_path / "in" / "a.png", cxr_phantom(np.random.default_rng(0), False)[0])
    with pytest.raises(BundleError):
        run_batch(tmp_path / "in", tmp_path / "no-such-bundle", tmp_path / "out.csv", cluster="local:1")
    assert not workers_left()

    bundle = cxr_bundle().path
    first = run_batch(tmp_path / "in", bundle, tmp_path / "out.csv", cluster="local:1")
    again = run_batch(tmp_path / "in", bundle, tmp_path / "out.csv", cluster="local:1")
    assert (first.processed, again.processed, again.skipped) == (1, 0, 1)
    assert not workers_left()
