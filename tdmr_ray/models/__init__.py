"""Model zoo: builders by name, checkpoint I/O, normalization-affine get/set."""
from .cifar_resnet import CifarResNet
from .factory import (NormalizedModel, build_from_arch, create_model, list_models, load_legacy_checkpoint,
                      pretrained_path, register_model)
from .norm_params import get_norm_affine, norm_affine_parameters, norm_modules, set_norm_affine

__all__ = ["CifarResNet", "NormalizedModel", "build_from_arch", "create_model", "list_models",
           "load_legacy_checkpoint", "pretrained_path", "register_model", "get_norm_affine",
           "norm_affine_parameters", "norm_modules", "set_norm_affine"]
