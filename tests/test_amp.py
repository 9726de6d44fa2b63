"""`runtime.amp: auto` (training.amp): a timed probe of fp32 vs bf16 on the real network, cached per
CPU model; explicit settings never probe. The probes here really run (tiny networks, small inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import amp
from training.zoo import create_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads wait on each other (the key has it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KDVIEWER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(amp, "machine_load", lambda: 0.5)  # caching is for calm machines (see below)
    return tmp_path / "cache" / "amp_probe.json"


def _resolve(pref: str = "auto", factory=None, **kw):
    args = {"arch": "smallcnn_s", "channels": 1, "input_size": 28, "batch_size": 4}
    args.update(kw)
    return amp.resolve(pref, CPU, model_factory=factory, **args)


def _never():
    raise AssertionError("the probe ran although it should not have")


def test_probe_runs_decides_by_its_own_numbers_and_is_cached(cache: Path) -> None:
    built: list[torch.nn.Module] = []

    def factory() -> torch.nn.Module:
        built.append(create_model("smallcnn_s", 2, 1, 0.0, "none", role="student"))
        return built[-1]

    d = _resolve(factory=factory)
    assert d.source == "probe" and len(built) == 1
    m = d.measured
    assert m["fp32_ms"] > 0 and m["bf16_ms"] > 0 and m["steps"] >= amp.PROBE_MIN_STEPS
    faster = m["bf16_ms"] <= amp.BF16_MIN_GAIN * m["fp32_ms"]
    assert d.dtype is (torch.bfloat16 if faster else None)
    assert d.channels_last is faster  # channels_last: auto follows the decision on a CPU
    assert f"{m['fp32_ms']:.0f} ms" in d.message and ("bf16 autocast" if faster else "-> fp32") in d.message
    assert amp.cpu_model_name() in d.message

    # the cache: keyed by CPU model, torch version, arch, input size; the next resolve does not probe
    entries = json.loads(cache.read_text())["entries"]
    (key,) = entries
    for part in (amp.cpu_model_name(), torch.__version__, "smallcnn_s", "28px"):
        assert part in key
    again = _resolve(factory=_never)
    assert again.source == "cache" and again.dtype is d.dtype and "cached measurement" in again.message
    # another input size is another key: probed again
    other = _resolve(factory=factory, input_size=32)
    assert other.source == "probe" and len(built) == 2
    assert len(json.loads(cache.read_text())["entries"]) == 2


@pytest.mark.parametrize(("fp32_ms", "bf16_ms", "want"), [(100.0, 40.0, torch.bfloat16), (100.0, 95.0, None)])
def test_cached_measurement_decides(cache: Path, fp32_ms: float, bf16_ms: float, want) -> None:
    """The decision rule on known numbers: bf16 only when clearly faster (an EPYC-like 2.5x gain vs an
    AMX Xeon's depthwise net that gains nothing)."""
    key = amp.cache_key("smallcnn_s", 1, 28, 4, True)
    cache.parent.mkdir(parents=True)
    entry = {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "steps": 2}
    cache.write_text(json.dumps({"version": amp.CACHE_VERSION, "entries": {key: entry}}))
    d = _resolve(factory=_never)
    assert d.source == "cache" and d.dtype is want and d.channels_last is (want is not None)
    # channels_last set explicitly wins over the decision
    cache.write_text(json.dumps({"version": amp.CACHE_VERSION, "entries": {
        amp.cache_key("smallcnn_s", 1, 28, 4, False): entry}}))
    d = _resolve(factory=_never, channels_last="off")
    assert d.dtype is want and d.channels_last is False


def test_a_busy_measurement_stands_in_until_a_calm_run(cache: Path, monkeypatch) -> None:
    busy = amp.busy_load() + 5
    monkeypatch.setattr(amp, "machine_load", lambda: busy)
    d = _resolve()
    assert d.source == "probe" and "measured again when the machine is calm" in d.message
    m = d.measured
    assert d.dtype is (torch.bfloat16 if m["bf16_ms"] <= amp.BF16_MIN_GAIN * m["fp32_ms"] else None)
    assert _resolve(factory=_never).source == "cache"  # still busy: no second probe
    monkeypatch.setattr(amp, "machine_load", lambda: 0.5)
    calm = _resolve()
    assert calm.source == "probe" and "calm" not in calm.message
    assert not next(iter(json.loads(cache.read_text())["entries"].values()))["busy"]
    assert _resolve(factory=_never).source == "cache"  # calm answers stay, busy or not
    monkeypatch.setattr(amp, "machine_load", lambda: busy)
    assert _resolve(factory=_never).source == "cache"


def test_a_damaged_cache_is_probed_again(cache: Path) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    d = _resolve()  # default factory: the configured arch with random weights
    assert d.source == "probe"
    assert json.loads(cache.read_text())["version"] == amp.CACHE_VERSION


@pytest.mark.parametrize(
    ("pref", "dtype"), [("off", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_explicit_settings_skip_the_probe(cache: Path, pref: str, dtype) -> None:
    d = _resolve(pref, factory=_never)
    assert d.source == "explicit" and d.dtype is dtype
    assert d.channels_last is (dtype is torch.bfloat16)
    assert not cache.exists()
    assert _resolve(pref, factory=_never, channels_last="on").channels_last is True


def test_gpu_auto(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """CUDA: bf16 where the GPU supports it, else fp16, channels_last; never a probe. MPS: fp32."""
    args = {"arch": "smallcnn_s", "channels": 1, "input_size": 28, "batch_size": 4, "model_factory": _never}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    d = amp.resolve("auto", torch.device("cuda"), **args)
    assert d.dtype is torch.bfloat16 and d.channels_last and d.source == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    d = amp.resolve("auto", torch.device("cuda"), **args)
    assert d.dtype is torch.float16
    d = amp.resolve("auto", torch.device("mps"), **args)
    assert d.dtype is None and not d.channels_last and not cache.exists()


def test_probe_leaves_the_model_as_it_was() -> None:
    model = create_model("smallcnn_s", 2, 1, 0.0, "none", role="student").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = amp.probe_cpu(model, 1, 28, 4, budget_s=0.0)
    assert m["steps"] == amp.PROBE_MIN_STEPS  # a spent budget still measures each variant twice
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last undone


def test_engine_run_reports_the_decision(tmp_path: Path, cache: Path) -> None:
    """A real run with amp auto: the probe's line is in the event stream after run_start, and the run
    trains with what it decided."""
    from kdviewer.events import EventWriter, parse_event
    from training.config import config_from_dict
    from training.engine import run
    from training.synth import generate

    data = Path(generate("cxr", 16, tmp_path / "data", fmt="png", seed=0, size=48))
    lines: list[str] = []

    class Sink:
        write = lines.append

        def flush(self) -> None: ...

        def close(self) -> None: ...

    cfg = {
        "data": {"root": str(data), "split": "random", "val_fraction": 0.3},
        "preprocessing": {"input_size": 32, "resize": 32},
        "student": {"arch": "smallcnn_s"},
        "optim": {"epochs": 1, "batch_size": 8},
        "runtime": {"amp": "auto", "threads": 1, "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "export": False},
    }
    result = run(config_from_dict(cfg), EventWriter("t", [Sink()]))
    assert result.status == "completed"
    events = [e for e in map(parse_event, lines) if e]
    kinds = [e["event"] for e in events]
    notes = [e["message"] for e in events if e["event"] == "log" and "amp auto on" in e["message"]]
    assert len(notes) == 1 and kinds.index("run_start") < kinds.index("log")
    d = _resolve(factory=_never, input_size=32, batch_size=8)  # the run's measurement, from the cache
    assert d.source == "cache"
    start = events[kinds.index("run_start")]
    assert start["amp"] == (None if d.dtype is None else "bfloat16")
    assert start["channels_last"] is d.channels_last
