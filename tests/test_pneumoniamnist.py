"""PneumoniaMNIST recipe: small-input architectures, and a tiny end-to-end smoke run on real images.

The smoke run uses 16 real PneumoniaMNIST images per split from ../shared/data (skipped without it):
teacher -> student -> bundle, then the helpers of scripts/pneumoniamnist.py (ablation evaluation, OOD
check on real adult chest X-rays, report with the ablation and OOD tables).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kdviewer.models.architectures import FeatureExtractor, build_model, get_module, spec_of
from training.complexity import count_flops

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "recipes" / "pneumoniamnist.yaml"


def _script():
    spec = importlib.util.spec_from_file_location(
        "pneumoniamnist_script", ROOT / "scripts" / "pneumoniamnist.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["resnet18_s", "resnet18_s_half", "smallcnn_s", "smallcnn_m"])
def test_small_input_arch_keeps_resolution(arch: str) -> None:
    model = build_model(arch, 2, 1, dropout=0.1).eval()
    spec = spec_of(model)
    sizes = {}
    hooks = [
        get_module(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))
        )
        for name in spec.feature_layers
    ]
    with torch.no_grad():
        logits, feats = FeatureExtractor(model)(torch.randn(3, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert logits.shape == (3, 2) and feats.shape[0] == 3
    # CIFAR-style stem: stages at 28, 14, 7, 4 px (an ImageNet stem would give 7, 4, 2, 1).
    assert [sizes[n] for n in spec.feature_layers] == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert spec.target_layer == "layer4" and spec.head == "fc"


def test_student_is_much_cheaper_than_teacher() -> None:
    student = count_flops(build_model("smallcnn_s", 2, 1), 28, 1)
    teacher = count_flops(build_model("resnet18_s_half", 2, 1), 28, 1)
    assert student * 4 < teacher


def test_recipe_is_valid_and_every_kd_method_builds() -> None:
    from training.config import load_config
    from training.losses import build_combiner

    cfg = load_config(RECIPE)
    assert cfg.teacher is not None and cfg.teacher.arch == "resnet18_s_half"
    assert cfg.student.arch == "smallcnn_s" and cfg.preprocessing.input_size == 28
    script = _script()
    student = build_model(cfg.student.arch, 2, 1)
    teacher = build_model(cfg.teacher.arch, 2, 1).eval()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 1, 0])
    from training.ablate import method_settings
    from training.config import KDConfig
    from training.losses import FeatureHooks

    for name in script.ABLATION_METHODS:
        methods = method_settings(cfg, name)
        if methods is None:
            continue
        kd = KDConfig(methods=methods)
        comb = build_combiner(kd, "single-label", 0.5, student, teacher, 1, 28)
        th = FeatureHooks(teacher, comb.teacher_layers(), embedding=comb.needs_embedding)
        with th, torch.no_grad():
            record = comb.teacher_record(th.outputs(teacher(x)))
        with FeatureHooks(student, comb.student_layers(), embedding=comb.needs_embedding) as sh:
            loss, parts = comb(sh.outputs(student(x)), record, y)
        assert torch.isfinite(loss), name
        assert methods[0]["name"] in parts, name


def test_tiny_pneumoniamnist_run_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    pm = shared_data / "pneumoniamnist"
    if not (pm / "train").is_dir():
        pytest.skip(f"{pm} is absent")
    from kdviewer.events import EventWriter
    from training.config import load_config
    from training.engine import run

    out = tmp_path / "run"
    cfg = load_config(
        RECIPE,
        [
            f"data.root={pm}",
            "data.limit=16",
            "teacher.epochs=1",
            "optim.epochs=1",
            "optim.batch_size=8",
            "output.bootstrap=20",
            "output.latency_runs=1",
            f"output.dir={out}",
            "runtime.threads=1",
        ],
        variant="quick",
    )
    with open(tmp_path / "events.jsonl", "w", encoding="utf-8") as fh:
        result = run(cfg, EventWriter("test", [fh]))
    assert result.status == "completed" and result.bundle is not None
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert manifest["student"]["architecture"] == "smallcnn_s"
    assert manifest["teacher"]["architecture"] == "resnet18_s_half"
    assert (result.bundle / "student.onnx").is_file() and (result.bundle / "ood.npz").is_file()

    script = _script()
    loader, names, paths = script.load_val(pm, limit=16)
    assert names == ["NORMAL", "PNEUMONIA"] and len(paths) == 16
    ev = script.evaluate_student(out, loader, names, [f"data.root={pm}"], n_boot=20)
    assert 0.0 <= ev["metrics"]["accuracy"]["value"] <= 1.0
    assert "balanced_accuracy" in ev["metrics"]

    ood = {"results": []}
    real = shared_data / "real-cxr"
    if real.is_dir():
        ood = script.ood_check(result.bundle, real, paths, threads=1, limit=3)
        adult, val = ood["results"]
        assert adult["n"] == 3 and val["n"] == 16
        assert adult["expected"].startswith("flagged") and val["expected"].startswith("not flagged")
    from training.report import write_report

    entry = {"name": "no KD", "metrics": ev["metrics"], "epochs": 1}
    html = write_report(
        out, tmp_path / "report.html", ablation=[entry], ood_results=ood["results"]
    ).read_text()
    assert "Ablation" in html and "no KD" in html
    if ood["results"]:
        assert "real-cxr" in html
