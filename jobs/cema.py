"""CEMA on a simulated fleet: hundreds of edge devices on Ray actors, one cloud adapter.

    python jobs/cema.py --preset quick
    ray job submit --working-dir . -- python jobs/cema.py --devices 1024 --method cema
    python jobs/cema.py --config my.yaml --cema.cloud.edge-lr 0.001

Writes summary.json and fleet.png (accuracy and upload fraction over time) to the output
directory; the edge parameter versions go to the registry as edge-<run-name>-<group or device>,
where Serve picks them up (serve/config.yaml: model <run-name>-edge, params_prefix edge-<run-name>-).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tdmr_ray.fleet import FLEET_PRESETS, FleetConfig, run_fleet  # noqa: E402
from tdmr_ray.fleet.run import check_config  # noqa: E402
from tdmr_ray.runtime import fail, start_job  # noqa: E402


def main(argv=None) -> dict:
    cfg, run = start_job("cema", FleetConfig, argv, FLEET_PRESETS, __doc__, validate=check_config)
    try:
        metrics, prefix = run_fleet(cfg, run)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    headline = {"run id": metrics["run_id"], "devices": metrics["devices"], "samples": metrics["samples"],
                "edge accuracy": f"{100 * metrics['accuracy']:.2f}%",
                "upload fraction": f"{100 * metrics['upload_fraction']:.2f}%",
                "fleet samples/s": metrics["samples_per_s"]}
    lift = metrics["lift"]
    if lift["lift"] is not None:
        headline["lift vs control (points, 95% CI)"] = (
            f"{100 * lift['lift']:+.2f} [{100 * lift['ci95'][0]:+.2f}, {100 * lift['ci95'][1]:+.2f}] "
            f"({lift['treatment_devices']} treatment / {lift['control_devices']} control devices)")
    if "adapter" in metrics:
        headline["refused / unsent candidate uploads"] = (
            f"{100 * metrics['refused_fraction']:.1f}% / "
            f"{100 * (metrics['refused_or_unsent_fraction'] - metrics['refused_fraction']):.1f}% "
            f"(sent {100 * metrics['sent_fraction']:.1f}% of samples)")
        headline["adapter samples/s (updates/s)"] = f"{metrics['adapter_samples_per_s']} ({metrics['adapter_updates_per_s']})"
        headline["upload->applied latency p50/p99 (s)"] = \
            f"{metrics['apply_latency_s']['p50']} / {metrics['apply_latency_s']['p99']}"
    return run.finish(metrics, headline, registry_version=f"{prefix}*")


if __name__ == "__main__":
    main()
