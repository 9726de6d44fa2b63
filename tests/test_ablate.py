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
