"""Ray Train plumbing shared by the TDMR and GDFQ jobs (Train V2).

- :func:`fit` builds and runs a ``TorchTrainer`` on the job's storage (local path or S3) with a
  ``FailureConfig``; running it again with the same ``run_name`` resumes from the newest checkpoint
  (Train V2's job-level restoration), which is how a killed job continues.
- Inside the train loop, :func:`report` sends metrics each epoch and (rank 0) a checkpoint of plain
  state dicts, saved with ``torch.save`` and loaded with ``weights_only=True``; :func:`restore_state`
  returns the newest one after a worker restart or a resumed run.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .storage import ray_storage_kwargs

STATE_FILE = "train_state.pt"


def fit(train_loop: Callable[[dict], None], loop_config: dict, *, run_name: str, num_workers: int,
        use_gpu: bool, storage: str, max_failures: int = 2, cpus_per_worker: float = 1, callbacks=None):
    """Run ``train_loop(loop_config)`` on ``num_workers`` Ray Train workers; returns the Result.

    ``callbacks``: Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_kwargs = ray_storage_kwargs(storage, "ray-train")
    if callbacks:
        run_kwargs["callbacks"] = callbacks
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), **run_kwargs))
    return trainer.fit()


def worker_setup(seed: int) -> tuple[torch.device, int, int]:
    """(device, world rank, world size) for this worker; seeds torch per rank and caps CPU threads."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(seed * 1000 + rank)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from ray.train.torch import get_device

    return get_device(), rank, world


def worker_nodes() -> int:
    """How many distinct Ray nodes this run's workers are on (a collective: call on every rank)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def report(metrics: dict, state: dict | None = None) -> None:
    """Report ``metrics``; with ``state``, rank 0 also attaches it as a checkpoint."""
    import ray.train

    if state is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_state() -> dict | None:
    """The newest checkpointed state of this run (after a failure or a resumed run), else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(Path(d) / STATE_FILE)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"corrupt or unreadable training checkpoint {path}: {exc}") from exc


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (for state dicts that load without the ``module.`` prefix)."""
    return model.module if hasattr(model, "module") else model
