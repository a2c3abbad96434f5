"""What a benchmark ran on, and how fast that machine is: wall-time figures (throughput, latency,
unsent shares) only compare across runs on machines of the same speed.

The reference speed is a ResNet-20 forward, batch 64, one torch thread, for about two seconds (the
measure of bench/serve.py's in-process limit, which runs 3 s on real images). On the 2-core machines
these benchmarks ran on it varied from 240-262 (AMD EPYC, AVX2, 2.0 GHz; bench/results/machine.md) to
856 images/s (bench/results/serve.md), and the fleet's adapter throughput with it (17.3 against 58.9
samples/s in one process, bench/results/fleet*.md)."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def forward_images_per_s(model, x: torch.Tensor, seconds: float) -> float:
    """Images/s of ``model``'s forward on batch ``x`` (after one warm-up call) for about ``seconds``."""
    with torch.inference_mode():
        model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += 1
    return n * len(x) / (time.perf_counter() - start)


def reference_speed(seconds: float = 2.0) -> float:
    """ResNet-20 forward images/s, batch 64, 1 torch thread (the caller's thread count restored)."""
    from tdmr_ray.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return round(forward_images_per_s(create_model("resnet20").eval(), torch.rand(64, 3, 32, 32), seconds), 1)
    finally:
        torch.set_num_threads(threads)


def describe() -> dict:
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "resnet20_forward_images_per_s": reference_speed()}


def headline(machine: dict) -> str:
    return (f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['isa']}; reference speed "
            f"{machine['resnet20_forward_images_per_s']} images/s (ResNet-20 forward, batch 64, 1 thread).")


if __name__ == "__main__":  # python bench/machine.py [--save]: --save appends the line to results/machine.md
    line = f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()}: {headline(describe())}"
    print(line)
    if "--save" in sys.argv[1:]:
        with open(Path(__file__).resolve().parent / "results" / "machine.md", "a") as f:
            f.write(line + "\n")
