"""Soak test: `bentoml serve` under a mixed load of valid and invalid uploads for a long time.

    python -m benchmarks.soak                      # concurrency 16 for 10 minutes (the default)
    python -m benchmarks.soak --duration 3600      # the 60-minute run
    python -m benchmarks.soak --smoke              # seconds: checks the script (make test)

`--concurrency` closed-loop clients (keep-alive; a connection the server closes is reopened) send, in a shuffled
cycle, 28x28 Fashion-MNIST PNGs one by one and four at a time, and about one request in four invalid: a truncated
JPEG, random bytes, a missing field, an ICO file, a wrong content type, an image over the pixel cap, an unknown path
(`benchmarks.loadgen.mixed_uploads`). An error is any answer whose status is not the one a correct server gives
that request (200, 400, 404, 413, 415), or a failed connection or timeout. The memory of the server's whole
process tree (supervisor and workers, RSS and PSS) is sampled every `--sample-s` seconds (a minute by default);
growth is measured from the first sample after the first minute, so that warm-up allocations do not count.
Output: results.json, results.md and results.png (memory and throughput over time) in
benchmarks/results/<machine>/soak/.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from ltserve.serve.process import ServerProcess

from benchmarks.common import add_common_args, markdown_table, output_dir, percentiles, write_results
from benchmarks.loadgen import Connection, mixed_uploads, tree_memory

REPO = Path(__file__).resolve().parents[1]
NAME = "soak"


async def soak(port: int, pid: int, concurrency: int, duration_s: float, sample_s: float,
               seed: int) -> dict[str, Any]:
    """Run the mixed closed-loop load for `duration_s` seconds, sampling the tree's memory every `sample_s`."""
    uploads = mixed_uploads(port, seed)
    start = time.monotonic()
    stop_at = start + duration_s
    latencies: dict[str, list[float]] = {}
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    per_interval: Counter[int] = Counter()
    samples = [{"t_s": 0.0, **tree_memory(pid)}]

    async def client(k: int) -> None:
        order = list(range(len(uploads)))
        random.Random(seed + k).shuffle(order)
        conn, i = Connection(port), 0
        while time.monotonic() < stop_at:
            up = uploads[order[i % len(order)]]
            i += 1
            t0 = time.perf_counter()
            try:
                status, _, body = await conn.request(up.raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                errors.append(f"{up.kind}: {exc!r}")
                statuses[f"{up.kind} failed"] += 1
                continue
            latencies.setdefault(up.kind, []).append((time.perf_counter() - t0) * 1000)
            statuses[f"{up.kind} {status}"] += 1
            per_interval[int((time.monotonic() - start) // sample_s)] += 1
            if status != up.expected:
                errors.append(f"{up.kind}: {status} (expected {up.expected}) {body[:200]!r}")
        conn.close()

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_s)
            t = time.monotonic() - start
            if t > duration_s + 1:
                return
            # psutil reads /proc: off the event loop, so the clients keep going
            samples.append({"t_s": t, **await asyncio.to_thread(tree_memory, pid)})
            print(f"  {t / 60:5.1f} min  {samples[-1]['rss_mb']:7.1f} MB RSS  {samples[-1]['pss_mb']:7.1f} MB PSS  "
                  f"{sum(statuses.values())} requests, {len(errors)} errors", flush=True)

    task = asyncio.create_task(sampler())
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.monotonic() - start
    task.cancel()
    samples.append({"t_s": wall, **tree_memory(pid)})
    return {"wall_s": wall, "requests": sum(statuses.values()), "req_s": sum(statuses.values()) / wall,
            "errors": len(errors), "first_errors": errors[:10], "statuses": dict(sorted(statuses.items())),
            "latency_ms": {k: {"n": len(v), **percentiles(v)} for k, v in sorted(latencies.items())},
            "requests_per_interval": [per_interval[i] for i in range(int(wall // sample_s) + 1)],
            "memory": samples, "growth": memory_growth(samples, sample_s)}


def memory_growth(samples: list[dict[str, Any]], after_s: float) -> dict[str, float | None]:
    """Growth of the tree's RSS and PSS (MB and %) from the first sample at or after `after_s` to the last."""
    later = [s for s in samples if s["t_s"] >= after_s - 1e-6]
    if len(later) < 2:
        return {"from_s": None, "rss_mb": None, "rss_%": None, "pss_mb": None, "pss_%": None}
    first, last = later[0], later[-1]
    return {"from_s": first["t_s"], "to_s": last["t_s"],
            **{f"{k}_mb": last[f"{k}_mb"] - first[f"{k}_mb"] for k in ("rss", "pss")},
            **{f"{k}_%": 100.0 * (last[f"{k}_mb"] / first[f"{k}_mb"] - 1.0) for k in ("rss", "pss")}}


def _plot(results: dict[str, Any], sample_s: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (mem, rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    samples = results["memory"]
    t = [s["t_s"] / 60 for s in samples]
    mem.plot(t, [s["rss_mb"] for s in samples], marker="o", label="RSS, whole tree")
    mem.plot(t, [s["pss_mb"] for s in samples], marker="o", label="PSS, whole tree")
    for role in ("supervisor", "worker"):
        per = [sum(p["pss_mb"] for p in s["processes"] if p["name"] == role) for s in samples]
        mem.plot(t, per, linestyle="--", label=f"PSS, {role}s")
    mem.set_ylabel("MB")
    mem.set_ylim(bottom=0)
    mem.legend(fontsize=8)
    mem.set_title(f"soak: memory and throughput ({results['errors']} errors in {results['requests']} requests)")
    counts = results["requests_per_interval"]
    # the last interval is cut short by the end of the run
    spans = [min(sample_s, results["wall_s"] - i * sample_s) for i in range(len(counts))]
    rate.bar([(i + 0.5) * sample_s / 60 for i in range(len(counts))],
             [c / span if span > 0.1 else 0.0 for c, span in zip(counts, spans)], width=0.8 * sample_s / 60)
    rate.set_ylabel("requests / s")
    rate.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, NAME)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "fashion-lt", help="model package")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 10 minutes)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between memory samples")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.sample_s, args.concurrency = 6.0, 2.0, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_dir(args, NAME)
    log = Path(tempfile.mkdtemp(prefix="soak_")) / "serve.log"
    server = ServerProcess({"LTSERVE_MODEL": str(args.model)}, log)
    try:
        server.wait_ready()
        info = httpx.get(server.url + "/model", timeout=10).json()
        print(f"soak: {args.concurrency} clients for {args.duration:g} s against {args.model} "
              f"({info['service']['workers']} workers); log {log}", flush=True)
        results = asyncio.run(soak(server.port, server.proc.pid, args.concurrency, args.duration, args.sample_s,
                                   args.seed))
        results["server"] = {"workers": info["service"]["workers"], "runtime": info["runtime"]}
    except BaseException:
        print(f"server log: {log}\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
    g = results["growth"]
    row = {"duration_min": results["wall_s"] / 60, "concurrency": args.concurrency, "requests": results["requests"],
           "req_s": results["req_s"], "errors": results["errors"],
           "rss_start_mb": results["memory"][0]["rss_mb"], "rss_end_mb": results["memory"][-1]["rss_mb"],
           "pss_growth_after_1st_sample_%": g["pss_%"], "rss_growth_after_1st_sample_%": g["rss_%"]}
    table = markdown_table([row], list(row))
    lat_rows = [{"request": k, **v} for k, v in results["latency_ms"].items()]
    notes = (f"Closed loop, keep-alive, {args.concurrency} clients; about one request in four invalid. Memory of the "
             f"server's process tree (supervisor + workers) sampled every {args.sample_s:g} s; growth from the "
             f"sample at {g['from_s'] or 0:.0f} s to the end (warm-up excluded). "
             "Errors: answers with another status than a correct server gives, failed connections, timeouts.\n\n"
             + markdown_table(lat_rows, ["request", "n", "p50", "p90", "p99", "mean"]) + "\n\nStatuses: "
             + ", ".join(f"{k}: {v}" for k, v in results["statuses"].items()))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(out, NAME, config, results, table, plot=lambda p: _plot(results, args.sample_s, p), notes=notes)
    print(table)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
