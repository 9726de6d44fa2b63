"""One helper (training.placement.Placement) puts a model and its inputs on one device, dtype, layout.

The GPU bug it removes: the final evaluation fed CUDA bf16 inputs to a model left on the CPU. On a
CPU-only machine the same mismatch is made with the ``meta`` device (a real second device: tensors
with shapes but no data) and with a model left in another dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import BatchLoader
from training.placement import Placement
from training.validation import evaluate
from training.zoo import create_model


@pytest.fixture(scope="module")
def loader(tmp_path_factory) -> BatchLoader:
    from training.config import DataConfig, PreprocessingConfig
    from training.data import build_datasets, discover
    from training.synth import generate

    root = Path(generate("cxr", 16, tmp_path_factory.mktemp("ph"), fmt="png", seed=5, size=40, patients=8))
    data = DataConfig(root=root, csv=root / "labels.csv", split="random", val_fraction=0.5)
    splits = discover(data, "single-label", 0)
    pre = PreprocessingConfig(input_size=32, resize=32).to_manifest()
    sets = build_datasets(splits, pre, data)
    return BatchLoader(sets["val"], 4)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cxrnet_s", 2, 1, 0.0, "none", role="student").eval()


def test_a_model_on_another_device_meets_its_inputs_there(loader):
    meta = Placement(torch.device("meta"))
    model = _model()  # on the CPU, as a best checkpoint is loaded
    _, x_meta, _ = next(loader.iter_batches(0, 0, "meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(x_meta)  # the mismatch the helper makes impossible
    placed = meta.model(model)
    for _, x, _ in meta.batches(loader):  # the loader is asked for the placement's device
        assert x.device.type == "meta" and x.dtype == torch.float32
        out = placed(x)
        assert out.device.type == "meta" and out.shape == (len(x), 2)
    assert all(p.device.type == "meta" for p in placed.parameters())


def test_evaluate_places_a_model_left_in_another_dtype_and_layout(loader):
    reference = evaluate(_model(), loader, "single-label", Placement.cpu())
    odd = _model().to(torch.bfloat16)
    _, x, _ = next(loader.iter_batches(0, 0, "cpu"))
    with pytest.raises(RuntimeError):
        odd(x)  # fp32 inputs, bf16 weights: what a stray .to(dtype) leaves behind
    place = Placement(torch.device("cpu"), amp=None, channels_last=True)
    res = evaluate(odd, loader, "single-label", place)
    assert next(odd.parameters()).dtype == torch.float32
    # bf16 weights lost precision once; the placed model still gives the same answers
    np.testing.assert_allclose(res["probs"], reference["probs"], atol=0.05)
    with_amp = evaluate(_model(), loader, "single-label", Placement(torch.device("cpu"), torch.bfloat16))
    np.testing.assert_allclose(with_amp["probs"], reference["probs"], atol=0.05)


def test_export_evaluation_and_complexity_use_the_placement(loader):
    from training.complexity import static_complexity
    from training.evaluate import evaluate_model

    model = _model().to(torch.float64)  # parameters in another dtype than the loader's images
    out = evaluate_model(model, loader, ["normal", "abnormal"], "single-label", "cpu", features=True)
    assert out["logits"].shape[1] == 2 and out["features"].shape[0] == len(out["targets"])
    assert next(model.parameters()).dtype == torch.float32
    assert static_complexity(Placement.cpu().model(model), 32, 1)["gflops"] > 0
    assert Placement.of(model).device == torch.device("cpu")
