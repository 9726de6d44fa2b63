"""Folder classification on a Dask cluster: the Dask backend of `kdviewer.batch.run_batch`.

``kdviewer classify FOLDER --cluster local[:N]`` starts a Dask ``LocalCluster`` with N worker processes
on this machine; ``--cluster tcp://HOST:8786`` uses a running scheduler whose workers (``dask worker
tcp://HOST:8786`` on other machines) read the same shared filesystem. Dask is imported only here, and
this module only when ``--cluster`` is given.

* Work units are batches of cases (about ``batch_size`` images; a CT series is one case, never split).
  A worker decodes, preprocesses and infers a whole unit and returns finished rows, built by the same
  code as the local pool (`kdviewer.batch.row_before_model`, `kdviewer.batch.infer_rows`).
* Each worker process opens the bundle once (`_worker_classifier`, a per-process cache) and keeps it
  for every later unit.
* Units are submitted in a bounded window (memory stays flat for 10^6 files) and their rows come back
  through ``distributed.as_completed``; the client writes and flushes them one row per case with the
  local path's writer, schema, progress callback and resume.
* Exactly once: a worker that dies mid-run has its units rescheduled by Dask; the client keeps a set
  of the cases written and drops a unit's rows that arrive a second time. A killed client rerun with
  the same command skips what the output already holds (`kdviewer.batch.read_done`).
* Failures: a missing Dask install, an unreachable scheduler (``CONNECT_TIMEOUT_S``) or a cluster
  without workers are a `ClusterError` before anything is classified; a unit whose task keeps killing
  its workers (a decoder crash) becomes error rows; any other exception of a worker (kdviewer not
  installed there, the bundle not on the shared filesystem) stops the run with a `ClusterError`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdviewer.batch import BatchError, Case, _decode_case, _one_line, _row, infer_rows, row_before_model

log = logging.getLogger(__name__)

#: Seconds to reach a scheduler (or start a local cluster) and to see its first worker.
CONNECT_TIMEOUT_S = 30.0

# tcp/tls/ucx://HOST[:PORT]; inproc:// is a cluster inside this process (tests, notebooks)
_ADDRESS = re.compile(r"^((tcp|tls|ucx)://[^\s/:]+(:\d{1,5})?|inproc://[^\s]+)$")


class ClusterError(BatchError):
    """The Dask backend cannot run: Dask not installed, scheduler unreachable, no workers, a worker
    without kdviewer or without access to the bundle."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``--cluster`` asked for: a local cluster of ``n_workers`` processes, or a scheduler address."""

    kind: str  # "local" | "address"
    n_workers: int = 0
    address: str = ""


def parse_cluster(spec: str) -> ClusterSpec:
    """``local`` (one worker per core), ``local:N`` or a scheduler address (``tcp://HOST:PORT``, also
    tls://, ucx://, inproc://); `ClusterError` otherwise."""
    text = spec.strip()
    if text == "local" or text.startswith("local:"):
        count = text.partition(":")[2]
        if not count:
            return ClusterSpec("local", n_workers=os.cpu_count() or 1)
        if not count.isdigit() or int(count) < 1:
            raise ClusterError(f"--cluster {spec!r}: the number of local workers must be a whole number >= 1")
        return ClusterSpec("local", n_workers=int(count))
    if _ADDRESS.match(text):
        return ClusterSpec("address", address=text)
    raise ClusterError(
        f"--cluster {spec!r} is neither 'local', 'local:N' nor a scheduler address like tcp://HOST:8786"
    )


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(
            "--cluster needs Dask distributed, which is not installed here: pip install 'kdviewer[cluster]' "
            "(on this machine and on every worker)"
        ) from exc
    return distributed


def _connect(spec: ClusterSpec, timeout: float) -> tuple[Any, Any]:
    """(a connected ``distributed.Client`` with at least one worker, the local cluster started for it or
    None); `ClusterError` when that cannot be had within ``timeout`` seconds (nothing is left running)."""
    distributed = _distributed()
    cluster = None
    try:
        if spec.kind == "local":
            # One task slot per worker process, which decodes a unit and then infers it with one ORT
            # thread: N processes keep N cores busy (two slots per process measured 105 vs 114-119
            # images/s on 2 cores, the same in the steady state, a later first row).
            # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's mmap
            # threshold: every full-size frame becomes a fresh mmap, page-faulted in and unmapped again
            # (22.7 vs 15.5 ms of worker CPU per file, 83 vs 117 images/s); kdviewer's workers free
            # their frames at once and do not need it.
            import dask

            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = distributed.LocalCluster(
                    n_workers=spec.n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.CRITICAL,  # shutdown heartbeats; our own errors are raised
                )
            client = distributed.Client(cluster, timeout=timeout)
        else:
            client = distributed.Client(spec.address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        if spec.kind == "local":
            raise ClusterError(f"could not start a local Dask cluster within {timeout:.0f} s "
                               f"({_one_line(exc)})") from exc
        raise ClusterError(f"cannot reach the Dask scheduler at {spec.address} within {timeout:.0f} s "
                           f"({_one_line(exc)}); is `dask scheduler` running there, and the port "
                           "open?") from exc
    except Exception as exc:  # e.g. worker processes that cannot start (RuntimeError from the nanny)
        if cluster is not None:
            cluster.close()
        raise ClusterError(
            f"could not start the Dask cluster: {type(exc).__name__}: {_one_line(exc)}") from exc
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        _disconnect(client, cluster)
        raise ClusterError(
            f"no Dask worker joined {spec.address or 'the local cluster'} within {timeout:.0f} s; start "
            "workers with `dask worker SCHEDULER_ADDRESS` on machines that see the same files"
        ) from exc
    return client, cluster


def _disconnect(client: Any, cluster: Any) -> None:
    client.close()
    if cluster is not None:
        cluster.close()


class ClusterConnection:
    """The client of a ``--cluster`` run, made when first asked for (`client`) and closed by `close`.

    A local cluster starts on a background thread as soon as this is made, so that the classifying
    process's own start (opening its bundle, reading what an earlier run wrote, listing the folder)
    happens meanwhile instead of before: in a fresh process, importing Dask and starting two workers
    took ~1.2 s and opening the shipped bundle ~0.5 s on a 2-core machine, both once per run. A
    scheduler address is connected to on the first `client` call (no processes to start; a run with
    nothing left to do never connects).
    """

    def __init__(self, spec: ClusterSpec, timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.spec = spec
        self._timeout = timeout
        self._conn: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if spec.kind == "local":
            self._thread = threading.Thread(target=self._start, name="kdviewer-cluster-start", daemon=True)
            self._thread.start()

    def _start(self) -> None:
        try:
            self._conn = _connect(self.spec, self._timeout)
        except BaseException as exc:  # raised again, on the caller's thread, by client()
            self._error = exc

    def client(self) -> Any:
        """The connected client; the `ClusterError` of a cluster that could not be started or reached."""
        if self._thread is not None:
            self._thread.join()
        elif self._conn is None and self._error is None:
            self._start()
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        return self._conn[0]

    def close(self) -> None:
        """Disconnect, and stop the local cluster (after its start, if that is still going on)."""
        if self._thread is not None:
            self._thread.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            _disconnect(*conn)


# ------------------------------------------------------------------------------------ worker side

_CLASSIFIERS: dict[tuple[str, str, int, bool], Any] = {}
_CLASSIFIERS_LOCK = threading.Lock()


def _worker_classifier(bundle_ref: str, use_int8: bool | str, threads: int, teacher: bool) -> Any:
    """This worker process's classifier for the bundle: opened on its first unit, reused after."""
    key = (bundle_ref, str(use_int8), threads, teacher)
    with _CLASSIFIERS_LOCK:
        clf = _CLASSIFIERS.get(key)
        if clf is None:
            from kdviewer.inference.predict import Classifier

            clf = _CLASSIFIERS[key] = Classifier(bundle_ref, use_int8=use_int8,  # type: ignore[arg-type]
                                                 threads=threads, load_teacher=teacher)
    return clf


def classify_unit(
    cases: list[Case],
    bundle_ref: str,
    teacher: bool,
    use_int8: bool | str,
    threads: int,
    heat_dir: str | None,
    anonymous: bool,
    heatmap_target: str | None = None,
) -> list[dict[str, Any]]:
    """Worker: decode, preprocess and infer one unit; returns one item per case: its finished ``row``
    (the local path's schema, not yet de-identified), the slices a series left out (``dropped``) and the
    number of images the model saw (``n_images``)."""
    clf = _worker_classifier(bundle_ref, use_int8, threads, teacher)
    pre_json = clf.pre.model_dump_json()
    out: list[dict[str, Any]] = []
    to_model: list[tuple[Case, dict[str, Any]]] = []
    for case in cases:
        res = _decode_case(case, pre_json)
        early = row_before_model(clf, case, res)
        if early is None:
            to_model.append((case, res))
            continue
        row, refused = early
        out.append({"path": case.path, "row": row, "n_images": 0,
                    "dropped": res.get("dropped") if refused is not None else []})
    heat = Path(heat_dir) if heat_dir else None
    for case, res, row, _pred, _comp in infer_rows(clf, to_model, teacher, heat, anonymous, heatmap_target):
        out.append({"path": case.path, "row": row, "n_images": len(res["array"]),
                    "dropped": res.get("dropped") or []})
    return out


# ------------------------------------------------------------------------------------ client side


def make_units(cases: list[Case], batch_size: int) -> list[list[Case]]:
    """Consecutive cases grouped into units of about ``batch_size`` files (a series is never split)."""
    units: list[list[Case]] = []
    unit: list[Case] = []
    n_files = 0
    for case in cases:
        unit.append(case)
        n_files += max(1, len(case.files))
        if n_files >= batch_size:
            units.append(unit)
            unit, n_files = [], 0
    if unit:
        units.append(unit)
    return units


def cluster_results(
    connection: ClusterConnection,
    cases: list[Case],
    bundle_ref: str,
    *,
    teacher: bool = False,
    use_int8: bool | str = "auto",
    threads: int = 2,
    batch_size: int = 16,
    heat_dir: Path | None = None,
    anonymous: bool = False,
    heatmap_target: str | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """Classify ``cases`` on the cluster of ``connection`` (the caller closes it); yields worker items (see
    `classify_unit`) as units complete.

    A unit can arrive twice when its worker died after finishing it: the caller dedupes by case.
    A local cluster has N processes with one task slot each and one ORT thread per task (N units
    decode and infer at once); the tasks of a remote cluster's workers use ``threads`` ORT threads each
    (start them with ``--nthreads 1`` per core).
    """
    units = make_units(cases, batch_size)
    if not units:
        return
    distributed = _distributed()
    worker_threads = 1 if connection.spec.kind == "local" else threads
    heat = str(heat_dir) if heat_dir is not None else None
    client = connection.client()
    workers = client.scheduler_info().get("workers", {})
    slots = max(1, sum(int(w.get("nthreads", 1) or 1) for w in workers.values()))
    window = 2 * slots + 1  # every task slot busy, one more unit queued for each
    queue = list(reversed(units))
    pending = distributed.as_completed()
    unit_of: dict[Any, list[Case]] = {}

    def submit() -> None:
        unit = queue.pop()
        fut = client.submit(classify_unit, unit, bundle_ref, teacher, use_int8, worker_threads, heat,
                            anonymous, heatmap_target, pure=False)
        unit_of[fut] = unit
        pending.add(fut)

    for _ in range(min(window, len(queue))):
        submit()
    for fut in pending:
        unit = unit_of.pop(fut)
        if cancel is not None and cancel.is_set():
            for other in list(unit_of):
                other.cancel()
            return
        try:
            items = fut.result()
        except distributed.KilledWorker as exc:  # the unit kept killing its workers (a decoder crash)
            why = _one_line(f"the Dask worker died while classifying this batch ({exc}); it may need "
                            "more memory than the worker has")
            items = [{"path": c.path, "row": _row(c, {"t_decode_ms": 0.0}, None, None, [], error=why),
                      "n_images": 0, "dropped": []} for c in unit]
        except Exception as exc:  # systematic: every unit would fail the same way
            for other in list(unit_of):
                other.cancel()
            raise ClusterError(
                f"a Dask worker could not classify: {type(exc).__name__}: {_one_line(exc)}. Every worker "
                f"needs kdviewer installed and must see the bundle ({bundle_ref}) and the images at the "
                "same paths as this machine (a shared filesystem)"
            ) from exc
        finally:
            fut.release()
        if queue:
            submit()
        yield from items
