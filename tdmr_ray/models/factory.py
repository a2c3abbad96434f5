"""Model builders by name, timm-style: ``create_model("resnet20", pretrained=True)``.

Every model comes wrapped in :class:`NormalizedModel`, which carries its input normalisation, so
callers always pass [0, 1] RGB (or grayscale) images. Names not registered here go to timm.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .cifar_resnet import CifarResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
# name -> (file name, URL) of published pretrained weights (pytorch_resnet_cifar10, BSD-2).
_CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
PRETRAINED_FILES = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
    "resnet110": "resnet110-1d1ed7c2.th",
    # ResNet-56 fine-tuned with AugMix + JSD on CIFAR-10-JPEG (../shared/tools/finetune_augmix.py):
    # corruption-robust, the offline stand-in for a large pretrained foundation. Not published.
    "resnet56_augmix": "resnet56_augmix-81241016.th",
}
# Weights that exist only where someone made them: no URL to download from.
_LOCAL_ONLY = {"resnet56_augmix": "make it with tools/finetune_augmix.py (see ../shared/data/README.md)"}
# A pretrained name whose architecture is another registered name.
_ARCH_OF = {"resnet56_augmix": 56}


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]):
        _BUILDERS[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_BUILDERS)


class NormalizedModel(nn.Module):
    """A backbone plus its input normalisation. Takes [0, 1] images.

    ``features(x)`` gives pooled pre-logit features, ``head(f)`` the logits; both are what the
    distillation methods (TDMR projectors, CEMA) need from any architecture.
    """

    def __init__(self, backbone: nn.Module, mean, std, arch: dict):
        super().__init__()
        self.backbone = backbone
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        self.arch = dict(arch)  # enough to rebuild: name, num_classes, in_chans

    @property
    def num_classes(self) -> int:
        return self.arch["num_classes"]

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"{self.arch['name']} expects images of shape (N, {self.mean.shape[1]}, H, W) in [0, 1], "
                f"got {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        b = self.backbone
        if isinstance(b, CifarResNet):
            return b.forward_features(x)
        return b.forward_head(b.forward_features(x), pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return b.forward_head(features) if isinstance(b, CifarResNet) else b.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def _cifar_resnet_builder(depth: int, name: str | None = None):
    name = name or f"resnet{depth}"

    def build(num_classes: int = 10, in_chans: int = 3, pretrained: bool = False,
              weights_dir: str | None = None) -> NormalizedModel:
        net = CifarResNet(depth, num_classes=num_classes, in_chans=in_chans)
        if pretrained:
            if num_classes != 10 or in_chans != 3:
                raise ValueError(f"pretrained {name} exists for 10 classes, 3 channels only")
            net.load_state_dict(load_legacy_checkpoint(pretrained_path(name, weights_dir)))
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.25,) * in_chans)
        return NormalizedModel(net, mean, std, {"name": name, "num_classes": num_classes, "in_chans": in_chans})

    return name, build


for _depth in (8, 20, 32, 44, 56, 110):  # 8: no published weights, a small target from scratch
    _name, _build = _cifar_resnet_builder(_depth)
    register_model(_name)(_build)
for _name, _depth in _ARCH_OF.items():
    register_model(_name)(_cifar_resnet_builder(_depth, _name)[1])


def pretrained_path(name: str, weights_dir: str | None = None) -> Path:
    """Find pretrained weights: ``weights_dir``, ``$TDMR_WEIGHTS``, the torch hub cache, else download."""
    if name not in PRETRAINED_FILES:
        raise ValueError(f"no pretrained weights for {name!r}: pretrained CIFAR ResNets are {sorted(PRETRAINED_FILES)}")
    fname = PRETRAINED_FILES[name]
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [Path(d) / fname for d in (weights_dir, os.environ.get("TDMR_WEIGHTS")) if d]
    candidates.append(hub_dir / fname)
    for path in candidates:
        if path.is_file():
            return path
    if name in _LOCAL_ONLY:
        looked = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(f"pretrained weights for {name} not found (looked at {looked}); they are not "
                                f"published: {_LOCAL_ONLY[name]}, put {fname} in a directory and set "
                                "TDMR_WEIGHTS to it")
    target = hub_dir / fname
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(_CIFAR_RESNET_URL + fname, str(target), progress=False)
    except Exception as exc:  # offline, proxy, ...
        looked = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(
            f"pretrained weights for {name} not found (looked at {looked}) and the download from "
            f"{_CIFAR_RESNET_URL + fname} failed ({exc}). Put {fname} in a directory and set "
            f"TDMR_WEIGHTS to it.") from exc
    return target


def load_legacy_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a pytorch_resnet_cifar10 ``.th`` file safely (``weights_only``), strip ``module.``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False,
                 weights_dir: str | None = None) -> NormalizedModel:
    """Build a model by name: a registered CIFAR ResNet, else any timm model (``timm/`` prefix optional)."""
    if name in _BUILDERS:
        return _BUILDERS[name](num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                               weights_dir=weights_dir)
    import timm

    timm_name = name.removeprefix("timm/")
    if not timm.list_models(timm_name) and timm_name not in timm.list_models(pretrained=True):
        raise ValueError(f"unknown model {name!r}: not one of {list_models()} and not a timm model name")
    net = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    cfg = net.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return NormalizedModel(net, mean, std, {"name": name, "num_classes": num_classes, "in_chans": in_chans})


def build_from_arch(arch: dict) -> NormalizedModel:
    """Rebuild an (untrained) model from ``NormalizedModel.arch``; weights come from a state dict."""
    unknown = set(arch) - {"name", "num_classes", "in_chans"}
    if unknown or "name" not in arch:
        raise ValueError(f"bad architecture record {arch}: needs 'name', unknown keys {sorted(unknown)}")
    return create_model(arch["name"], num_classes=arch.get("num_classes", 10), in_chans=arch.get("in_chans", 3))
