"""Settings of a fleet run (``jobs/cema.py``): devices, streams, the cloud adapter, the method."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..cema.config import CEMAConfig, CloudConfig, EdgeConfig, FilterConfig, method_config, redundancy_margin_for
from ..config import flatten
from ..runtime import CommonConfig


# The fleet's cloud step: 16 uploaded samples at half the reference's learning rates (reference: 32
# at 2.5e-3 / 2.5e-4). A key's batch fills in half the time and its step takes half as long, which
# halves upload->applied at a camera's pace; at the reference's rates twice as many steps cost 2-4
# points, at half the rates -0.34 / -0.21 / +0.09 over 3 seeds (reset / continual / label;
# bench/results/cema_diagnosis_cloudbs16_lr{,_s12}.md).
FLEET_CLOUD_STEP = {"batch_size": 16, "edge_lr": 1.25e-3, "foundation_lr": 1.25e-4}


def fleet_cema_config() -> CEMAConfig:
    """CEMA's settings for the fleet. Three departures from the algorithm's defaults, all because a
    fleet ships parameter sets through the registry to devices that adapt on their own streams:
    the edge moves its own test-batch statistics (``stats_source="local"``; updates carry affine
    parameters only, which is also what Serve applies), the redundancy margin fits 10 classes
    (the reference's 0.05 is for 1,000 classes and would drop nearly every sample here), and the
    cloud steps on smaller batches at lower rates (``FLEET_CLOUD_STEP``: updates sooner)."""
    return CEMAConfig(edge=EdgeConfig(stats_source="local"),
                      filter=FilterConfig(redundancy_margin=redundancy_margin_for(10)),
                      cloud=CloudConfig(**FLEET_CLOUD_STEP))


@dataclass
class FleetConfig(CommonConfig):
    run_name: str = "cema"  # registry names: edge-<run_name>-<key> (what Serve reads)
    # A run starts clean: its run id is <run_name>-<output dir name>; its adapter state
    # (cema-adapter-<run id>), upload log and host checkpoints are its own, and its devices apply
    # only parameter versions published by this run. --resume RUN_ID continues that run instead
    # (after a driver crash: same settings, the id printed at its start and in summary.json).
    resume: str = ""
    devices: int = 256
    hosts: int = 0  # device-host actors; 0: one per CPU left after the adapter's (at least 1)
    batches_per_device: int = 8
    batch_size: int = 64  # edge batch (reference: 64)
    # Seconds between two batches of one device (its camera's pace); 0: as fast as the hosts run,
    # which on a small machine makes devices produce candidates faster than the cloud can learn.
    device_interval_s: float = 0.0
    dataset: str = "cifar10-jpeg"  # test split; each corruption is applied on top of it
    corruptions: list[str] = field(default_factory=lambda: ["gaussian_noise", "defocus_blur", "fog"])
    severity: int = 5
    pool_size: int = 1000  # images per corruption pool (devices draw their own seeded orders)
    edge: str = "resnet20"  # a model name (pretrained) or a registry reference name@vN
    foundation: str = "resnet56_augmix"  # the corruption-robust stand-in for a large foundation
    method: str = "cema_plus"  # a tdmr_ray.cema.METHODS name (none, bn_adapt, upload_all, cema, cema_plus, ...)
    # Devices that run the same edge (TBR, filter, uploads) but never apply a cloud update: the
    # control group the lift (treatment - control accuracy) is measured against. 0: none.
    control_fraction: float = 0.1
    key_by: str = "group"  # adaptation state per "group" (devices sharing a corruption) or per "device"
    uploads: bool = True  # False: devices filter but send nothing and no adapter runs (measures the edge alone)
    max_in_flight: int = 64  # per host: unacknowledged uploads; more are dropped (edge never waits)
    # The cloud side: `adapters` shards, each owning the keys that hash to it (its own queue, upload
    # log and checkpoint), each with `adapter_cpus` CPUs (scaled down to fit next to one host when
    # the cluster is small) and `adapter_gpus` GPUs (fractions share one: 0.25).
    adapters: int = 1
    adapter_cpus: float = 1.0
    adapter_gpus: float = 0.0
    adapter_resources: str = ""  # a custom resource the adapters' node offers (pins them, e.g. to the head)
    # Samples a shard holds unprocessed, split over its active keys; more are refused ("busy"). Hosts
    # stay below it by spending the rate each shard advertises, so refusals are rare.
    adapter_queue_samples: int = 1024
    adapter_coalesce: int = 1  # cloud batches of one key a shard takes per turn (one publish per turn)
    # A shard pays the replay-only steps a key is owed (CEMA's: one per upload that completed no cloud
    # batch) once no upload has waited for this many seconds; its advertised capacity counts new samples'
    # steps only. (Run after any turn that left the queues empty, their time counted as new-sample work
    # and lowered the advertised capacity; where shards share cores, a lightly loaded shard's replay also
    # took the cores a busy one needed.) Negative: never.
    adapter_replay_idle_s: float = 1.0
    adapter_target_queue_s: float = 1.5  # the queue each key's advertised rate aims at, in seconds of work
    poll_interval_s: float = 0.25  # hosts read the shards' version boards (new versions, rates) this often
    poll_timeout_s: float = 2.0
    min_upload: int = 8  # a device sends no fewer samples than this (or all it has): no tiny messages
    # A host's token bucket holds at most this many seconds of a key's rate, or the time between two of
    # the key's uploads from that host if longer (paced devices: tdmr_ray.fleet.budget)
    burst_s: float = 2.0
    checkpoint_every_s: float = 20.0  # adapter state -> registry; uploads in between are in the log
    round_batches: int = 1  # batches per device between two host checkpoints
    progress_interval_s: float = 5.0  # hosts post running totals, the driver prints a progress line, this often
    plot: bool = True
    cema: CEMAConfig = field(default_factory=fleet_cema_config)
    # cema.* keys (dotted, e.g. "cloud.source_pull") whose values above win over the method's own
    # settings (METHODS; e.g. cema_plus sets cloud.source_pull=0.01). The loader adds every cema key
    # the YAML file or the flags set, so `--method cema_plus --cema.cloud.source-pull 0` turns
    # cema_plus's pull off; without it a method's settings would silently replace the user's.
    cema_pinned: list[str] = field(default_factory=list)

    def with_explicit_keys(self, keys: list[str]) -> "FleetConfig":
        """Called by the config loader with the dotted keys the file and flags set: pin the cema ones."""
        given = {k[len("cema."):] for k in keys if k.startswith("cema.")}
        return dataclasses.replace(self, cema_pinned=sorted(set(self.cema_pinned) | given))

    def cema_config(self) -> CEMAConfig:
        """The algorithm's settings of this run: ``cema`` with the method's preset applied, the pinned
        keys keeping their values here (an unknown pinned key is a ValueError)."""
        return method_config(self.method, self.cema, self.pinned_cema_values())

    def pinned_cema_values(self) -> dict:
        values = flatten(dataclasses.asdict(self.cema))
        unknown = sorted(set(self.cema_pinned) - set(values))
        if unknown:
            raise ValueError(f"cema_pinned: unknown cema key {unknown[0]!r}")
        return {k: values[k] for k in self.cema_pinned}


FLEET_PRESETS = {
    "quick": {"devices": 256, "batches_per_device": 3, "pool_size": 500},
    "full": {"devices": 256, "batches_per_device": 40, "pool_size": 10000,
             "corruptions": ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression"]},
}
