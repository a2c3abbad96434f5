"""Datasets (CIFAR-10, ImageFolder dirs and archives, .npz) and CIFAR-10-C corruptions."""
from .datasets import (CIFAR10_CLASSES, DatasetNotFound, ImageSet, data_root, extract_archive, has_split,
                       load_dataset, load_image_folder, load_npz, to_float)

__all__ = ["CIFAR10_CLASSES", "DatasetNotFound", "ImageSet", "data_root", "extract_archive", "has_split",
           "load_dataset", "load_image_folder", "load_npz", "to_float"]
from .corruptions import CORRUPTIONS, SEVERITY_CONSTANTS, corrupt, corrupt_dataset  # noqa: E402

__all__ += ["CORRUPTIONS", "SEVERITY_CONSTANTS", "corrupt", "corrupt_dataset"]
