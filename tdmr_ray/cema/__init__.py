"""CEMA (Chen et al., ICLR 2024): cloud-edge model adaptation by selective entropy distillation.

Plain PyTorch, no Ray. The edge (:class:`EdgeRunner`, per-device :class:`EdgeDeviceState`) and
the cloud (:class:`CloudAdapter`) talk only through :class:`UploadMessage` and
:class:`UpdateMessage`; :func:`run_stream` drives both synchronously in one process.
"""
from .cloud import CloudAdapter
from .config import (FILTER_PRESETS, METHODS, CEMAConfig, CloudConfig, EdgeConfig, FilterConfig, MethodSpec,
                     TentConfig, method_config, redundancy_margin_for)
from .edge import EdgeDeviceState, EdgeResult, EdgeRunner
from .filters import FilterState, Selection, current_e_max, redundancy_filter, select_uploads
from .losses import distillation_loss, entropy, entropy_weights, weighted_entropy_loss
from .messages import Accounting, UpdateMessage, UploadMessage, validate_upload
from .norm import TestTimeBatchNorm2d, convert_to_test_time_bn
from .simulate import StreamResult, make_edge_runner, run_stream
from .tent import TentEdgeRunner

__all__ = ["CloudAdapter", "FILTER_PRESETS", "METHODS", "CEMAConfig", "CloudConfig", "EdgeConfig",
           "FilterConfig", "MethodSpec", "TentConfig", "method_config", "redundancy_margin_for",
           "EdgeDeviceState", "EdgeResult", "EdgeRunner", "FilterState", "Selection", "current_e_max",
           "redundancy_filter", "select_uploads", "distillation_loss", "entropy", "entropy_weights",
           "weighted_entropy_loss", "Accounting", "UpdateMessage", "UploadMessage", "validate_upload",
           "TestTimeBatchNorm2d", "convert_to_test_time_bn", "StreamResult", "make_edge_runner",
           "run_stream", "TentEdgeRunner"]
