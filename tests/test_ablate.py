"""`kd-train ablate`: every (method, seed) student is a real engine run on the recipe, evaluated on val."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from training import ablate
from training.cli import main as kd_train
from training.zoo import create_model


@pytest.fixture(scope="module")
def recipe_and_teacher(tmp_path_factory) -> tuple[Path, Path]:
    from training.synth import generate

    root = tmp_path_factory.mktemp("abl")
    data = Path(generate("cxr", 32, root / "data", fmt="png", seed=0, size=40, patients=16))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "data": {"root": str(data), "split": "random", "val_fraction": 0.3},
                "preprocessing": {"input_size": 32, "resize": 32},
                "teacher": {"arch": "cxrnet_s", "epochs": 1},
                "student": {"arch": "smallcnn_s"},
                "kd": {"methods": [{"name": "hinton", "T": 3, "alpha": 0.6}]},
                "optim": {"epochs": 1, "batch_size": 8},
                "runtime": {"amp": "off", "threads": 1, "seed": 0},
                "output": {"dir": str(root / "main"), "export": False},
            }
        ),
        encoding="utf-8",
    )
    teacher = root / "teacher.pt"
    torch.save(create_model("cxrnet_s", 2).state_dict(), teacher)
    return recipe, teacher


@pytest.mark.timeout(900)
def test_ablation_table_over_methods_and_seeds(recipe_and_teacher, tmp_path) -> None:
    recipe, teacher = recipe_and_teacher
    out = tmp_path / "ablation"
    rc = kd_train(
        [
            "ablate",
            str(recipe),
            "--methods",
            "none,hinton",
            "--seeds",
            "0,1",
            "--teacher",
            str(teacher),
            "--out",
            str(out),
            "--bootstrap",
            "20",
        ]
    )
    assert rc == 0
    table = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    assert [(r["method"], r["seed"]) for r in table["runs"]] == [
        ("none", 0),
        ("hinton", 0),
        ("none", 1),
        ("hinton", 1),
    ]
    for r in table["runs"]:
        acc = r["metrics"]["accuracy"]
        assert 0.0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1.0
        cfg = yaml.safe_load(
            (out / f"{r['method']}-s{r['seed']}" / "config.yaml").read_text(encoding="utf-8")
        )
        assert cfg["runtime"]["seed"] == r["seed"] and cfg["output"]["export"] is False
        if r["method"] == "none":
            assert cfg["teacher"] is None and cfg["kd"]["methods"] == []
        else:  # the given teacher, frozen, with the recipe's own Hinton settings
            assert cfg["teacher"]["weights"] == str(teacher) and cfg["teacher"]["epochs"] == 0
            assert [m["name"] for m in cfg["kd"]["methods"]] == [r["method"]]
            if r["method"] == "hinton":
                assert cfg["kd"]["methods"][0]["T"] == 3 and cfg["kd"]["methods"][0]["alpha"] == 0.6
    means = {m["method"]: m for m in table["means"]}
    assert set(means) == {"none", "hinton"}
    vals = [r["metrics"]["roc_auc"]["value"] for r in table["runs"] if r["method"] == "hinton"]
    assert means["hinton"]["metrics"]["roc_auc"]["value"] == pytest.approx(sum(vals) / 2)
    assert "Hinton (seed 1)" in (out / "ablation.md").read_text(encoding="utf-8")

    # a rerun (e.g. after a kill) reuses the finished runs instead of training again
    again = ablate.run_ablation(recipe, out, teacher, methods=["none"], seeds=[0], n_boot=20)
    assert again["runs"][0]["metrics"]["accuracy"] == table["runs"][0]["metrics"]["accuracy"]
    assert again["runs"][0]["wall_s"] is None  # not re-run


def test_methods_take_the_recipes_settings_or_their_defaults(recipe_and_teacher) -> None:
    from training.config import load_config

    cfg = load_config(recipe_and_teacher[0])
    assert ablate.method_settings(cfg, "none") is None
    assert ablate.method_settings(cfg, "hinton")[0]["T"] == 3  # the recipe's
    assert ablate.method_settings(cfg, "fitnets") == [{"name": "fitnets"}]  # not in the recipe: defaults


def test_ablation_refuses_unknown_methods_and_a_missing_teacher(recipe_and_teacher, tmp_path, capsys) -> None:
    recipe, _ = recipe_and_teacher
    with pytest.raises(ValueError, match="unknown KD method"):
        kd_train(["ablate", str(recipe), "--methods", "none,telepathy", "--out", str(tmp_path)])
    assert kd_train(["ablate", str(recipe), "--methods", "hinton", "--teacher", str(tmp_path / "nope")]) == 2
    assert "no teacher" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_multilabel_ablation_reports_every_label_and_the_teacher_arm(tmp_path) -> None:
    """Multi-label: per-label AUCs with CIs and val positives; the teacher arm evaluates the given teacher
    for the recipe's seed and trains the teacher recipe alone for another seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["path,findings,patient_id"]
    for i in range(48):
        labs = [n for n, p in (("A", 0.5), ("B", 0.3)) if rng.random() < p]
        img = rng.integers(0, 80, (32, 32)).astype(np.uint8)
        if "A" in labs:
            img[8:24, 8:24] += 120  # a bright square: learnable in an epoch
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'|'.join(labs) or 'No Finding'},{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1,
        "task": "multi-label",
        "data": {"csv": str(tmp_path / "labels.csv"), "label_column": "findings", "split": "patient",
                 "stratify_patients": True, "val_fraction": 0.4, "classes": ["A", "B"],
                 "negative_labels": ["No Finding"]},
        "preprocessing": {"input_size": 32, "resize": 32},
        "teacher": {"arch": "cxrnet_s", "epochs": 1},
        "student": {"arch": "smallcnn_s"},
        "kd": {"methods": [{"name": "at"}]},
        "optim": {"epochs": 1, "batch_size": 8},
        "runtime": {"amp": "off", "threads": 1, "seed": 0},
        "output": {"dir": str(tmp_path / "main"), "export": False},
    }), encoding="utf-8")
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("cxrnet_s", 2).state_dict(), teacher)
    out = tmp_path / "ablation"
    rc = kd_train(["ablate", str(recipe), "--methods", "teacher", "--seeds", "0,1", "--teacher", str(teacher),
                   "--out", str(out), "--bootstrap", "20"])
    assert rc == 0
    table = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    assert table["task"] == "multi-label" and table["class_names"] == ["A", "B"]
    assert [(r["method"], r["seed"]) for r in table["runs"]] == [("teacher", 0), ("teacher", 1)]
    given, trained = table["runs"]
    assert trained["weights"] is None and trained["epochs"] == 1
    assert given["weights"] == str(teacher.resolve()) and not (out / "teacher-s0").exists()
    cfg = yaml.safe_load((out / "teacher-s1" / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["student"]["arch"] == "cxrnet_s" and cfg["teacher"] is None and cfg["kd"]["methods"] == []
    assert sum(table["support"]) > 0
    for r in table["runs"]:
        for k in ("roc_auc", "roc_auc:A", "roc_auc:B"):
            assert 0.0 <= r["metrics"][k]["value"] <= 1.0
    md = (out / "ablation.md").read_text(encoding="utf-8")
    assert "Per-label ROC-AUC on val" in md and "| A |" in md and "| **macro** |" in md
