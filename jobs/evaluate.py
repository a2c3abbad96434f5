"""Evaluate pretrained edge/foundation models on clean and shifted CIFAR-10, one Ray task per pair.

    python jobs/evaluate.py --preset quick
    ray job submit --working-dir . -- python jobs/evaluate.py --models resnet20,resnet56

Publishes the evaluated models to the registry (with their accuracies) so that the other jobs and
Serve can refer to them as ``<model>-cifar10@vN``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import ray  # noqa: E402

from tdmr_ray.runtime import CommonConfig, fail, init_ray, start_job  # noqa: E402

PRESETS = {
    "quick": {"limit": 2000, "corruptions": ["gaussian_noise", "defocus_blur", "fog"]},
    "full": {"limit": 0, "corruptions": ["all"]},
}


@dataclass
class EvaluateConfig(CommonConfig):
    models: list[str] = field(default_factory=lambda: ["resnet20", "resnet56"])
    corruptions: list[str] = field(default_factory=list)  # CIFAR-10-C types on the JPEG test set; "all"
    severity: int = 5
    limit: int = 0  # images per shifted set (0 = all 10,000)
    publish: bool = True


@ray.remote(num_cpus=1)
def evaluate_pair(model_name: str, dataset: str, corruption: str | None, severity: int, limit: int,
                  seed: int) -> float:
    import torch

    from tdmr_ray.data import load_dataset
    from tdmr_ray.evaluation import accuracy
    from tdmr_ray.models import create_model

    torch.set_num_threads(1)
    data = load_dataset(dataset, "test")
    if dataset != "cifar10-clean-subset":
        data = data.sample(limit, seed)
    if corruption:
        from tdmr_ray.data.corruptions import corrupt_dataset

        data = corrupt_dataset(data, corruption, severity, seed)
    return accuracy(create_model(model_name, pretrained=True), data)


def main(argv=None) -> dict:
    cfg, run = start_job("evaluate", EvaluateConfig, argv, PRESETS, __doc__)
    corruptions = cfg.corruptions
    if corruptions == ["all"]:
        from tdmr_ray.data.corruptions import CORRUPTIONS

        corruptions = list(CORRUPTIONS)
    sets = [("clean", "cifar10-clean-subset", None), ("jpeg", "cifar10-jpeg", None)]
    sets += [(f"{c}-{cfg.severity}", "cifar10-jpeg", c) for c in corruptions]
    init_ray()
    with run.phase("evaluate"):
        futures = {(m, label): evaluate_pair.remote(m, ds, c, cfg.severity, cfg.limit, cfg.seed)
                   for m in cfg.models for label, ds, c in sets}
        try:
            results = dict(zip(futures, ray.get(list(futures.values()))))
        except ray.exceptions.RayTaskError as exc:
            fail(str(exc.cause if hasattr(exc, "cause") else exc))
    metrics = {m: {label: round(results[m, label], 2) for label, _, _ in sets} for m in cfg.models}
    version = None
    if cfg.publish:
        from tdmr_ray.models import create_model
        from tdmr_ray.registry import Registry

        registry = Registry.for_storage(cfg.storage)
        for m in cfg.models:
            version = registry.publish_model(f"{m}-cifar10", create_model(m, pretrained=True),
                                             metrics={"top1": metrics[m]}).ref
    lines = {f"{m} top-1 {label}": f"{acc:.2f}%" for m in cfg.models for label, acc in metrics[m].items()}
    return run.finish(metrics, lines, registry_version=version)


if __name__ == "__main__":
    main()
