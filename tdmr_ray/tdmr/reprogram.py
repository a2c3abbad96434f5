"""Phase 1 modules: the foundation model as a teacher for a downstream task.

A :class:`FoundationTeacher` is ``output_mapping(foundation(input_transform(x)))``:

- :class:`InputTransform` adapts any image (any size, 1 or 3 or C channels) to the foundation's
  input: channel adaptation, resize, then a visual prompt ("pad" or "additive").
- the foundation (a :class:`~tdmr_ray.models.NormalizedModel`, CNN or transformer) gives pooled
  features and its own logits; it stays frozen except for the fine-tuned-KD baseline.
- :class:`OutputMapping` maps features and/or logits into the *proxy space* (a learnt embedding)
  and classifies the downstream labels from it.

Only the transform and the mapping train in TDMR; :meth:`FoundationTeacher.trainable_modules`
names them so a distributed loop can wrap exactly those in DDP and leave the frozen foundation out.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import NormalizedModel
from ..models.cifar_resnet import CifarResNet
from .config import TeacherConfig


class TeacherOutput(NamedTuple):
    proxy: torch.Tensor  # (N, proxy_dim) representation the target's projector matches
    logits: torch.Tensor  # (N, num_classes) downstream predictions


def foundation_input_size(foundation: NormalizedModel) -> int:
    """The side length the foundation was built for: 32 for CIFAR ResNets, else timm's config."""
    backbone = foundation.backbone
    if isinstance(backbone, CifarResNet):
        return 32
    patch_embed = getattr(backbone, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        return int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


class InputTransform(nn.Module):
    """Downstream images -> foundation inputs: channel adaptation, resize, visual prompt.

    - channels: a 1x1 convolution from ``in_chans`` to the foundation's channels, initialised to
      replicate a single channel (grayscale -> RGB) or to average several; absent when the counts
      match; learnt with the prompt (fixed with ``prompt="none"``).
    - resize (bilinear, antialiased when shrinking) to ``input_size`` ("additive", "none") or to
      ``input_size - 2 * pad_width`` ("pad").
    - ``pad``: the resized image sits in the centre of an ``input_size`` canvas whose frame of
      width ``pad_width`` is learnt (reprogramming as in Elsayed et al. 2019 / Tsai et al. 2020);
      the frame starts at the foundation's mean colour, i.e. zero after normalisation.
    - ``additive``: a learnt full-size perturbation added to the resized image (visual prompting,
      Bahng et al. 2022, with the whole canvas as prompt), starting at zero.
    """

    def __init__(self, in_chans: int, out_chans: int, input_size: int, prompt: str = "additive",
                 pad_width: int = 4, mean: torch.Tensor | None = None):
        super().__init__()
        self.prompt_kind, self.input_size, self.pad_width = prompt, input_size, pad_width
        self.channel_map = None
        if in_chans != out_chans:
            self.channel_map = nn.Conv2d(in_chans, out_chans, 1, bias=True)
            nn.init.constant_(self.channel_map.weight, 1.0 / in_chans)
            nn.init.zeros_(self.channel_map.bias)
            # With no prompt there is nothing to learn at the input (linear probe, fine-tuning).
            self.channel_map.requires_grad_(prompt != "none")
        self.image_size = input_size - 2 * pad_width if prompt == "pad" else input_size
        if self.image_size < 1:
            raise ValueError(f"pad_width {pad_width} leaves no room for the image in {input_size}px")
        self.prompt = None
        if prompt == "pad":
            fill = (mean if mean is not None else torch.full((out_chans,), 0.5)).view(1, out_chans, 1, 1)
            self.prompt = nn.Parameter(fill.expand(1, out_chans, input_size, input_size).clone())
            mask = torch.ones(1, 1, input_size, input_size)
            mask[..., pad_width:input_size - pad_width, pad_width:input_size - pad_width] = 0
            self.register_buffer("frame_mask", mask)
        elif prompt == "additive":
            self.prompt = nn.Parameter(torch.zeros(1, out_chans, input_size, input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_map is not None:
            x = self.channel_map(x)
        if x.shape[-2:] != (self.image_size, self.image_size):
            shrink = x.shape[-1] > self.image_size or x.shape[-2] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=shrink)
        if self.prompt_kind == "pad":
            p = self.pad_width
            return F.pad(x, (p, p, p, p)) + self.prompt * self.frame_mask
        if self.prompt_kind == "additive":
            return x + self.prompt
        return x


class OutputMapping(nn.Module):
    """Foundation features and/or logits -> proxy representation -> downstream logits.

    proxy = ReLU(Linear(concat(LayerNorm(features), LayerNorm(logits)))), width ``proxy_dim``;
    logits = Linear(dropout(proxy)). The LayerNorms put features and logits on one scale. With
    ``proxy_dim == 0`` the mapping is a single linear head and its input is the proxy (this is the
    linear probe of the baselines when ``inputs == "features"`` without normalisation).
    """

    def __init__(self, num_features: int, num_foundation_classes: int, num_classes: int,
                 inputs: str = "both", proxy_dim: int = 128, normalize: bool = True, dropout: float = 0.1):
        super().__init__()
        self.inputs = inputs
        dims = {"features": num_features, "logits": num_foundation_classes}
        used = ["features", "logits"] if inputs == "both" else [inputs]
        self.norms = nn.ModuleDict({k: nn.LayerNorm(dims[k]) if normalize else nn.Identity() for k in used})
        in_dim = sum(dims[k] for k in used)
        self.embed = nn.Sequential(nn.Linear(in_dim, proxy_dim), nn.ReLU()) if proxy_dim else nn.Identity()
        self.proxy_dim = proxy_dim or in_dim
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.proxy_dim, num_classes)

    @property
    def needs_logits(self) -> bool:
        return "logits" in self.norms

    def forward(self, features: torch.Tensor, logits: torch.Tensor | None) -> TeacherOutput:
        parts = {"features": features, "logits": logits}
        z = torch.cat([self.norms[k](parts[k]) for k in self.norms], dim=1)
        proxy = self.embed(z)
        return TeacherOutput(proxy, self.classifier(self.dropout(proxy)))


class FoundationBody(nn.Module):
    """The foundation as one ``forward``: images -> (pooled features, its own logits or None).

    One forward call is what DDP needs to synchronise the fine-tuned foundation's gradients.
    """

    def __init__(self, model: NormalizedModel, with_logits: bool):
        super().__init__()
        self.model, self.with_logits = model, with_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.model.features(x)
        return features, (self.model.head(features) if self.with_logits else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar ``.module``) wrapper, else the module itself."""
    return getattr(module, "module", module)


class FoundationTeacher(nn.Module):
    """Frozen (or, for fine-tuned KD, trainable) foundation between an input transform and a mapping."""

    def __init__(self, foundation: NormalizedModel, transform: InputTransform, mapping: OutputMapping,
                 train_foundation: bool = False):
        super().__init__()
        self.transform, self.mapping = transform, mapping
        self.body = FoundationBody(foundation, mapping.needs_logits)
        self.train_foundation = train_foundation
        foundation.requires_grad_(train_foundation)
        self.train(False)

    @property
    def foundation(self) -> NormalizedModel:
        return unwrap(self.body).model

    @property
    def proxy_dim(self) -> int:
        return unwrap(self.mapping).proxy_dim

    def train(self, mode: bool = True) -> "FoundationTeacher":
        super().train(mode)
        # A frozen foundation always runs with its running BN statistics: its weights are not
        # being fitted, and batch statistics of a few hundred downstream images would drift them.
        self.body.train(mode and self.train_foundation)
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that learn, by attribute name (for optimisers and for wrapping in DDP)."""
        parts = {"transform": self.transform, "mapping": self.mapping}
        if self.train_foundation:
            parts["body"] = self.body
        return {k: m for k, m in parts.items() if any(p.requires_grad for p in m.parameters())}

    def wrap_trainable(self, wrap) -> "FoundationTeacher":
        """Replace each trainable part by ``wrap(part)`` (e.g. DDP); the frozen foundation stays unwrapped."""
        for name, module in self.trainable_modules().items():
            setattr(self, name, wrap(module))
        return self

    def unwrap_trainable(self) -> "FoundationTeacher":
        """Undo :meth:`wrap_trainable` (before saving, or distilling from the frozen teacher)."""
        for name in ("transform", "mapping", "body"):
            setattr(self, name, unwrap(getattr(self, name)))
        return self

    def proxy_classifier(self) -> nn.Linear:
        """Proxy space -> downstream logits; the target's projector is read through it."""
        return unwrap(self.mapping).classifier

    def forward(self, x: torch.Tensor) -> TeacherOutput:
        x = self.transform(x)
        # Without trainable parts before the mapping, the foundation needs no graph: the linear
        # probe then costs a forward pass only.
        needs_graph = torch.is_grad_enabled() and (
            self.train_foundation or any(p.requires_grad for p in self.transform.parameters()))
        with torch.set_grad_enabled(needs_graph):
            features, logits = self.body(x)
        return self.mapping(features, logits)


def build_teacher(foundation: NormalizedModel, in_chans: int, num_classes: int,
                  cfg: TeacherConfig) -> FoundationTeacher:
    """Wrap ``foundation`` for a downstream task with ``in_chans`` channels and ``num_classes`` labels."""
    input_size = cfg.input_size or foundation_input_size(foundation)
    out_chans = foundation.mean.shape[1]
    transform = InputTransform(in_chans, out_chans, input_size, cfg.prompt, cfg.pad_width,
                               foundation.mean.flatten().detach().clone())
    mapping = OutputMapping(foundation.num_features, foundation.num_classes, num_classes, cfg.mapping_inputs,
                            cfg.proxy_dim, cfg.normalize_mapping_inputs, cfg.mapping_dropout)
    return FoundationTeacher(foundation, transform, mapping, cfg.train_foundation).to(foundation.mean.device)
