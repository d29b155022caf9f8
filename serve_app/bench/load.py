"""Bounded load / soak: `python -m serve_app.bench load --url http://127.0.0.1:8000 ...`.

N requests (or until a duration passes) at concurrency C against a server on this machine:
successes, each error class, p50/p95/p99 latency, throughput, and the resident memory of the
local Ray Serve processes after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import socket
import statistics
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

SERVER_ACTOR_CLASSES = ("ServeReplica", "ProxyActor", "ServeController")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200, help="stop after this many")
    parser.add_argument("--duration", type=float, default=None, help="or after this many seconds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20, help="requests before the RSS baseline")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--model", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--out", default="results/load.json")
    parser.add_argument(
        "--allow-remote", action="store_true", help="permit a target outside this machine"
    )


def check_local(url: str) -> None:
    """Load is for servers on this machine unless the operator says otherwise."""
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(address).is_loopback for address in addresses):
        raise SystemExit(f"{url} is not on this machine (use --allow-remote for a server you run)")


def serve_processes() -> dict[int, str]:
    """PID -> actor class (`ProxyActor`, `ServeController`, `ServeReplica:<app>:<deployment>`) of
    the Serve processes on this machine, from Ray's own actor table (process titles change while
    replicas work, so they cannot be trusted). Connects to the local cluster if needed; empty
    when there is none."""
    import psutil
    import ray
    from ray._private import state

    if not ray.is_initialized() and not _connect_to_local_cluster():
        return {}
    actors = state.actors(actor_state_name="ALIVE").values()
    return {
        actor["Pid"]: actor["ActorClassName"]
        for actor in actors
        if actor["ActorClassName"].startswith(SERVER_ACTOR_CLASSES)
        and actor["Pid"]
        and psutil.pid_exists(actor["Pid"])
    }


def _connect_to_local_cluster() -> bool:
    """Join the cluster `serve run` started on this machine; Ray 2.60 local clusters use token
    authentication (the token is in ~/.ray/auth_token), so retry with it."""
    import os

    import ray

    for auth_mode in (None, "token"):
        if auth_mode:
            os.environ.setdefault("RAY_AUTH_MODE", auth_mode)
        try:
            ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
            return True
        except Exception:  # noqa: BLE001 - no reachable cluster: nothing to measure
            continue
    return False


def server_rss_bytes() -> dict[str, int]:
    """Resident memory of this machine's Ray Serve processes, keyed `pid:actor class`."""
    import psutil

    usage = {}
    for pid, actor_class in serve_processes().items():
        try:
            usage[f"{pid}:{actor_class}"] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return usage


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_load(args) -> dict:
    import httpx

    body = {
        "prompt": "a lighthouse at dawn",
        "size": args.size,
        "n": args.n,
        "num_inference_steps": args.steps,
    }
    if args.model:
        body["model"] = args.model
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.duration if args.duration else float("inf")
    latencies: list[tuple[float, str]] = []
    outcomes: Counter[str] = Counter()
    rss: dict[str, dict[str, int]] = {}
    batch_images: list[int] = []
    issued = 0
    lock = asyncio.Lock()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while True:
            async with lock:
                if issued >= args.requests or time.monotonic() >= deadline:
                    return
                issued += 1
                number = issued
            started = time.monotonic()
            try:
                response = await client.post("/v1/images/generations", json=body)
                if response.status_code == 200:
                    outcome = "ok"
                    header = response.headers.get("x-batch-images", "")
                    batch_images.extend(int(v) for v in header.split(",") if v.isdigit())
                else:
                    code = (response.json().get("error") or {}).get("code")
                    outcome = f"{response.status_code}:{code}"
            except httpx.HTTPError as exc:
                outcome = f"transport:{type(exc).__name__}"
            latencies.append((time.monotonic() - started, outcome))
            outcomes[outcome] += 1
            if number == args.warmup:
                rss["after_warmup"] = server_rss_bytes()

    started = time.monotonic()
    async with httpx.AsyncClient(
        base_url=args.url, timeout=args.timeout, headers=headers
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    rss["end"] = server_rss_bytes()
    ok = [latency for latency, outcome in latencies if outcome == "ok"]
    # Growth of the processes that existed at both points; replicas started meanwhile (autoscaling)
    # are new memory, not growth, and are reported apart.
    baseline = rss.get("after_warmup", rss["end"])
    common = baseline.keys() & rss["end"].keys()
    before = sum(baseline[key] for key in common)
    after = sum(rss["end"][key] for key in common)
    new = sum(rss["end"][key] for key in rss["end"].keys() - baseline.keys())
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "api_key")},
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "successes": outcomes.get("ok", 0),
        "outcomes": dict(outcomes),
        "throughput_rps": round(len(ok) / elapsed, 3) if elapsed else 0,
        "images_per_s": round(len(ok) * args.n / elapsed, 3) if elapsed else 0,
        "mean_batch_images": round(statistics.fmean(batch_images), 2) if batch_images else None,
        "latency_s": {
            "p50": percentile(ok, 50),
            "p95": percentile(ok, 95),
            "p99": percentile(ok, 99),
            "mean": statistics.fmean(ok) if ok else None,
        },
        "server_rss_mib": {
            "after_warmup": round(before / 2**20, 1),
            "end": round(after / 2**20, 1),
            "growth_percent": round(100 * (after - before) / before, 2) if before else None,
            "processes": len(common),
            "measured": sorted(key.split(":", 1)[1] for key in common),
            "new_processes": len(rss["end"].keys() - baseline.keys()),
            "new_processes_mib": round(new / 2**20, 1),
        },
    }


def run(args) -> dict:
    if not args.allow_remote:
        check_local(args.url)
    result = asyncio.run(run_load(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    latency = result["latency_s"]
    print(
        f"{result['requests']} requests in {result['seconds']} s at concurrency "
        f"{args.concurrency}: {result['successes']} ok, outcomes {result['outcomes']}\n"
        f"latency p50 {latency['p50']}, p95 {latency['p95']}, p99 {latency['p99']} s; "
        f"{result['throughput_rps']} req/s\n"
        f"server RSS {result['server_rss_mib']['after_warmup']} -> "
        f"{result['server_rss_mib']['end']} MiB ({result['server_rss_mib']['growth_percent']}%)"
    )
    print(f"wrote {out}")
    return result
