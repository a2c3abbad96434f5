"""Where one CEMA method loses to another: the gap per stream mode, corruption and part of each
corruption's stretch, read from the per-batch traces of a ``bench/cema_algorithm.py`` result.

    python bench/cema_gap.py bench/results/cema_algorithm_quick.json --a cema_plus --b upload_all

Trains nothing. For each mode and corruption the batches of that corruption are cut into
``--parts`` consecutive parts; a cell is mean(edge accuracy of A - edge accuracy of B) over the
batches of that part (each batch counts once; a corruption's last, smaller batch counts as a
whole one), mean ± std over the seeds both methods ran; beside it, the share of that corruption's
samples A uploaded. Writes ``<output>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _runs(results: list[dict], method: str) -> dict[tuple[str, int], dict]:
    return {(r["mode"], r["seed"]): r["trace"] for r in results if r["method"] == method}


def _segments(tags: list[str]) -> list[tuple[str, int, int]]:
    """(corruption, first batch, end) of each consecutive stretch of one tag."""
    out, start = [], 0
    for i in range(1, len(tags) + 1):
        if i == len(tags) or tags[i] != tags[start]:
            out.append((tags[start], start, i))
            start = i
    return out


def gaps(results: list[dict], a: str, b: str, parts: int, n_per_corruption: int
         ) -> tuple[dict[str, dict[str, list[list[float]]]], dict[str, dict[str, list[float]]]]:
    """({mode: {corruption: [whole, part 1, ...: [gap per seed, points]]}}, {mode: {corruption:
    [A's upload share per seed]}})."""
    runs_a, runs_b = _runs(results, a), _runs(results, b)
    common = sorted(set(runs_a) & set(runs_b))
    if not common:
        raise SystemExit(f"no (mode, seed) ran both {a!r} and {b!r}")
    out: dict[str, dict[str, list[list[float]]]] = {}
    shares: dict[str, dict[str, list[float]]] = {}
    for mode, seed in common:
        ta, tb = runs_a[(mode, seed)], runs_b[(mode, seed)]
        if ta["tag"] != tb["tag"]:
            raise SystemExit(f"{mode} seed {seed}: the two runs saw different streams")
        diff = (np.asarray(ta["edge_acc"]) - np.asarray(tb["edge_acc"])) * 100
        for corruption, lo, hi in _segments(ta["tag"]):
            # cells[0]: the whole stretch; cells[1:]: its parts (equal weight per batch in each)
            cells = out.setdefault(mode, {}).setdefault(corruption, [[] for _ in range(parts + 1)])
            cells[0].append(float(diff[lo:hi].mean()))
            for k, chunk in enumerate(np.array_split(diff[lo:hi], parts)):
                cells[k + 1].append(float(chunk.mean()))
            shares.setdefault(mode, {}).setdefault(corruption, []).append(
                float(sum(ta["uploaded"][lo:hi])) / n_per_corruption)
    return out, shares


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):+.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:+.2f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a bench/cema_algorithm.py JSON")
    p.add_argument("--a", default="cema_plus")
    p.add_argument("--b", default="upload_all")
    p.add_argument("--parts", type=int, default=2, help="consecutive parts of each corruption's stretch")
    p.add_argument("--output", default="", help="path without suffix (default: bench/results/cema_gap_<result stem>)")
    args = p.parse_args(argv)
    data = json.loads(Path(args.result).read_text())
    table, shares = gaps(data["results"], args.a, args.b, args.parts, data["meta"]["n_per_corruption"])
    out = Path(args.output or f"bench/results/cema_gap_{Path(args.result).stem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"result": args.result, "a": args.a, "b": args.b,
                                                    "parts": args.parts, "gaps": table,
                                                    "upload_share_a": shares}, indent=1))
    header = " | ".join(f"part {k + 1}/{args.parts}" for k in range(args.parts))
    lines = [f"# {args.a} - {args.b}: online accuracy gap (points) per corruption and part of its stretch", "",
             f"From `{args.result}` (per-batch traces; each batch counts once), mean ± std over seeds. "
             f"Command: `python bench/cema_gap.py {args.result} --a {args.a} --b {args.b} --parts {args.parts}`", ""]
    for mode, per_corruption in table.items():
        lines += [f"## Mode: {mode}", "", f"| corruption | {args.a} uploads | whole | {header} |",
                  "|---|---:|---:|" + "---:|" * args.parts]
        for corruption, cells in per_corruption.items():
            share = f"{np.mean(shares[mode][corruption]):.1%}"
            lines.append(f"| {corruption} | {share} | " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
