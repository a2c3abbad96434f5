"""What one delivered parameter version costs a device host: ``DeviceHost._apply`` at fleet sizes.

A host applies each version of a key's parameters to all of the key's treatment devices at once (one
validation, one indexed write into its state bank, a counter update per device). This times that
call in one process, without Ray, for hosts of 1,024 / 3,333 / 10,000 devices (one group key: every
treatment device of the host takes the version), and writes ``bench/results/host_apply<tag>.{json,md}``.

    python bench/host_apply.py --devices 1024 3333 10000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from tdmr_ray.cema import UpdateMessage  # noqa: E402
from tdmr_ray.fleet import DeviceHost, FleetConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def time_apply(devices: int, versions: int, tmp: Path) -> dict:
    cfg = FleetConfig(devices=devices, corruptions=["clean"], pool_size=64, storage=str(tmp / "store"))
    pools = {"clean": (np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64))}
    host = DeviceHost(cfg, 0, list(range(devices)), pools, [None], str(tmp / f"run{devices}"))
    base = host.runner.initial_affine
    seconds = []
    for v in range(1, versions + 1):
        update = UpdateMessage("clean", v, {k: t * (1 + 0.01 * v) for k, t in base.items()})
        start = time.perf_counter()
        assert host._apply(update)
        seconds.append(time.perf_counter() - start)
    treated = len(host.treatment_rows["clean"])
    return {"devices": devices, "treatment_devices": treated, "versions": versions,
            "apply_ms_median": round(1e3 * statistics.median(seconds), 2),
            "apply_ms_max": round(1e3 * max(seconds), 2),
            "us_per_device": round(1e6 * statistics.median(seconds) / treated, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1024, 3333, 10000])
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--tag", default="")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    info = machine.describe()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [time_apply(n, args.versions, Path(tmp)) for n in args.devices]
    for r in rows:
        print(json.dumps(r), flush=True)
    command = "python bench/host_apply.py " + " ".join(argv or sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"host_apply{args.tag}.json").write_text(json.dumps({"command": command, "machine": info,
                                                                           "rows": rows}, indent=1))
    cols = list(rows[0])
    lines = [f"Host apply cost (one process, 1 thread). Command: `{command}`", "", machine.headline(info), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (args.out_dir / f"host_apply{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
