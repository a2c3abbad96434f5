"""What a benchmark ran on, and how fast that machine is: wall-time figures (throughput, latency,
unsent shares) only compare across runs on machines of the same speed.

The reference speed is a ResNet-20 forward, batch 64, one torch thread, for about two seconds: on
the 2-core machines these benchmarks ran on it varied from ~160 (AMD EPYC, AVX2, 2.0 GHz) to ~850
images/s (bench/results/serve.md's in-process limit), and the fleet's adapter throughput with it."""
from __future__ import annotations

import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reference_speed(seconds: float = 2.0) -> float:
    """ResNet-20 forward images/s, batch 64, 1 torch thread (the caller's thread count restored)."""
    from tdmr_ray.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, x = create_model("resnet20").eval(), torch.rand(64, 3, 32, 32)
        with torch.inference_mode():
            model(x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                model(x)
                n += len(x)
        return round(n / (time.perf_counter() - start), 1)
    finally:
        torch.set_num_threads(threads)


def describe() -> dict:
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "resnet20_forward_images_per_s": reference_speed()}


def headline(machine: dict) -> str:
    return (f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['isa']}; reference speed "
            f"{machine['resnet20_forward_images_per_s']} images/s (ResNet-20 forward, batch 64, 1 thread).")


if __name__ == "__main__":
    print(headline(describe()))
