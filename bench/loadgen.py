"""Closed-loop HTTP load: C concurrent clients for D seconds, run in its own process so the
client's CPU is not counted as the server's. Prints one JSON line: requests, failures, latencies.

    python bench/loadgen.py URL BODY_FILE CONCURRENCY SECONDS [HEADER=VALUE ...]
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def client(session, url, body, headers, deadline, latencies, failures, versions):
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as r:
                payload = await r.read()
                if r.status != 200:
                    failures.append(r.status)
                    continue
                if versions is not None:
                    versions.append(json.loads(payload).get("params"))
        except aiohttp.ClientError as exc:
            failures.append(str(exc)[:80])
            continue
        latencies.append(time.perf_counter() - t0)


async def main(url, body_file, concurrency, seconds, headers, track_versions):
    body = open(body_file, "rb").read()
    latencies, failures = [], []
    versions = [] if track_versions else None
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, headers={"content-type": "application/json"}) as session:
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*[client(session, url, body, headers, deadline, latencies, failures, versions)
                               for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    out = {"requests": len(latencies), "failures": len(failures), "failure_examples": failures[:3],
           "seconds": elapsed, "latencies": latencies}
    if versions is not None:
        out["versions"] = versions
    print(json.dumps(out))


if __name__ == "__main__":
    url, body_file, concurrency, seconds, *rest = sys.argv[1:]
    track = "--versions" in rest
    hdrs = dict(h.split("=", 1) for h in rest if "=" in h)
    asyncio.run(main(url, body_file, int(concurrency), float(seconds), hdrs, track))
