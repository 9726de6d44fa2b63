"""training.config: recipes load, errors name their field, overrides and variants, `check --json`."""

from __future__ import annotations

import json

import pytest
import yaml

from training.cli import main
from training.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    list_recipes,
    load_config,
    resolve_recipe,
    validate,
)

MINIMAL = {"data": {"root": "."}, "student": {"arch": "resnet18"}}


def test_every_recipe_and_variant_loads():
    recipes = list_recipes()
    assert {p.name[:3] for p in recipes} >= {"000", "001", "002", "003", "004"}
    for path in recipes:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig) and cfg.description
        if path.name[:3].isdigit():  # the seed-paper recipes run out of the box on synthetic phantoms
            assert cfg.data.generate is not None, f"{path.name}: recipes default to synthetic data"
        for name in cfg.variants:
            load_config(path, variant=name)


def test_recipes_follow_the_seed_papers():
    r000 = load_config("000")
    hinton = r000.kd.method("hinton")
    assert (r000.teacher.arch, r000.student.arch, hinton.T, hinton.alpha) == ("resnet50", "resnet18", 10, 0.7)
    assert (r000.optim.name, r000.optim.lr, r000.optim.momentum, r000.optim.batch_size) == (
        "sgd",
        1e-3,
        0.9,
        64,
    )
    assert (r000.teacher.epochs, r000.optim.epochs, r000.student.dropout) == (30, 25, 0.6)
    assert r000.data.val_fraction == 0.3 and not r000.preprocessing.augment.enabled
    r002 = load_config("002")
    assert (r002.teacher.arch, r002.kd.method("hinton").T, r002.optim.name, r002.optim.weight_decay) == (
        "resnet34",
        4,
        "adam",
        1e-5,
    )
    assert (r002.optim.schedule.name, r002.optim.schedule.step_size, r002.optim.schedule.gamma) == (
        "step",
        10,
        0.1,
    )
    r003 = load_config("003")
    assert r003.preprocessing.intensity == "window" and r003.preprocessing.channels == 1
    assert load_config("003", variant="ghost_resnet50").student.arch == "ghost_resnet50"
    assert load_config("003", variant="baseline_resnet50").teacher is None
    r004 = load_config("004")
    assert (r004.teacher.arch, r004.student.arch, r004.task, r004.data.split) == (
        "densenet121",
        "densenet40",
        "multi-label",
        "patient",
    )
    assert (r004.optim.lr, r004.optim.schedule.step_size, r004.optim.schedule.gamma) == (5e-5, 16, 0.5)
    aug = r004.preprocessing.augment
    assert (r004.preprocessing.resize, r004.preprocessing.input_size, aug.rotation, aug.hflip) == (
        256,
        224,
        15,
        True,
    )
    assert r004.kd.method("at") is not None
    r001 = load_config("001")
    assert {m.name for m in r001.kd.methods} == {"hinton", "fitnets", "rkd"}


def test_errors_name_the_field():
    raw = {
        "data": {"root": "x", "val_fraction": 1.5},
        "student": {"arch": "resnet999"},
        "kd": {"methods": [{"name": "hinton", "T": -1}]},
        "optim": {"lr": 0, "scheduel": "step"},
        "runtime": {"device": "gpu"},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    locs = {e["loc"] for e in err.value.errors}
    assert {"data.val_fraction", "student.arch", "optim.lr", "optim.scheduel", "runtime.device"} <= locs
    assert any(loc.startswith("kd.methods.0") and loc.endswith("T") for loc in locs)
    assert "resnet999" in str(err.value) and "resnet18" in str(err.value)  # lists the known architectures


def test_kd_without_teacher_and_missing_data():
    with pytest.raises(ConfigError, match="teacher"):
        config_from_dict({**MINIMAL, "kd": {"methods": ["hinton"]}})
    with pytest.raises(ConfigError) as err:
        config_from_dict({"student": {"arch": "resnet18"}})
    assert err.value.errors[0]["loc"] == "data"


def test_overrides_and_method_mapping():
    cfg = config_from_dict(
        {**MINIMAL, "teacher": {"arch": "resnet34"}, "kd": {"methods": {"hinton": {"T": 3}, "at": None}}},
        overrides=[
            "optim.lr=0.05",
            "optim.schedule=cosine",
            "runtime.channels_last=true",
            "kd.methods.0.alpha=0.5",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.schedule.name == "cosine" and cfg.runtime.channels_last == "on"
    assert [m.name for m in cfg.kd.methods] == ["hinton", "at"] and cfg.kd.methods[0].alpha == 0.5
    assert cfg.task_weight() == pytest.approx(0.5)
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, overrides=["novalue"])
    assert err.value.errors[0]["loc"] == "--set"


def test_teacher_optim_inherits_and_overrides():
    cfg = config_from_dict(
        {
            **MINIMAL,
            "teacher": {"arch": "resnet50", "epochs": 7, "optim": {"lr": 0.1}},
            "optim": {"name": "sgd", "batch_size": 16},
        }
    )
    t = cfg.teacher_optim()
    assert (t.name, t.lr, t.batch_size, t.epochs) == ("sgd", 0.1, 16, 7)


def test_yaml_syntax_error_has_a_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad)


def test_check_cli_json(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"root": str(tmp_path)}, "student": {"arch": "resnet18"}}))
    assert main(["check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(tmp_path / "nope")},
                "optim": {"lr": -1},
                "teacher": {"arch": "resnet18", "weights": str(tmp_path / "w.pt")},
            }
        )
    )
    capsys.readouterr()
    assert main(["check", str(bad), "--json"]) == 2
    issues = json.loads(capsys.readouterr().out)
    assert {"loc": "optim.lr", "msg": "Input should be greater than 0"} in issues
    # schema errors come first; after fixing them, the file-system checks name their fields too
    issues = validate(bad, overrides=["optim.lr=0.1"])
    assert {i["loc"] for i in issues} == {"data.root", "teacher.weights"}
    assert resolve_recipe("002").name.startswith("002")


def test_check_data_finds_images_and_classes_like_run(tmp_path, capsys):
    """`check --data` discovers the data as `run` does: a recipe's NORMAL/PNEUMONIA match lower-case
    folders; classes that match nothing are a problem *before* the run, naming the labels present."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    for cls, n in (("normal", 6), ("pneumonia", 4)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16), 30 * i, np.uint8)).save(root / cls / f"{cls}{i}.png")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(root), "classes": ["NORMAL", "PNEUMONIA"]}}))
    assert main(["check", str(cfg), "--data", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["errors"] == [] and out["data"]["classes"] == ["NORMAL", "PNEUMONIA"]
    assert out["data"]["labels_found"] == {"normal": 6, "pneumonia": 4}
    c = out["data"]["counts"]
    assert c["train"] + c["val"] + c["test"] == 10
    assert main(["check", str(cfg)]) == 0  # without --data: the schema and file checks only
    capsys.readouterr()
    cfg.write_text(yaml.safe_dump({"data": {"root": str(root), "classes": ["cat", "dog"]}}))
    assert main(["check", str(cfg), "--data", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and out["data"]["labels_found"] == {"normal": 6, "pneumonia": 4}
    msg = out["errors"][0]["msg"]
    assert "no labelled images found" in msg and "normal, pneumonia" in msg and "cat, dog" in msg
