#!/usr/bin/env python3
"""Local model benchmark (a benchmark, not a test): tokens/s and
time-to-first-token of the tiny model, streamed through the whole gateway.

Starts broker, edge, auth, router (AIGW_LOCAL_MODELS=1), bridge and one
Python model worker (python/aigw_model_worker.py --models tiny) on loopback
with tests/integration/gateway.py, warms up, then runs streaming chat
completions against local/tiny at 1 and 8 concurrent clients. Each request
asks for max_tokens (default 64) with stream_options.include_usage; tokens
are the usage's completion_tokens; TTFT is from sending the request to the
first chunk with content. Results are printed and written into
docs/PERFORMANCE.md between <!-- local-bench:begin --> and
<!-- local-bench:end -->.

    AIGW_BUILD=build /usr/bin/python3 tests/bench/local.py
    BENCH_SHORT=1 ...        fewer requests
    BENCH_LOCAL_REQUESTS=N   requests per concurrency level (default 48)
    BENCH_LOCAL_CAPACITY=N   the worker's batch slots (default 8)
    BENCH_LOCAL_MAX_TOKENS=N tokens asked per request (default 64)
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
os.environ.setdefault("AIGW_BUILD", str(REPO / "build"))

from conftest import BUILD, PYTHON, Procs  # noqa: E402
from gateway import Gateway  # noqa: E402

DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- local-bench:begin -->", "<!-- local-bench:end -->"


def one_stream(port: int, key: str, max_tokens: int) -> Tuple[float, float, int]:
    """One streamed request: (ttft s, total s, completion tokens)."""
    body = json.dumps({"model": "local/tiny", "stream": True, "max_tokens": max_tokens,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "tell me a story"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json",
                          "Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
    ttft = None
    tokens = 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if ttft is None and any(c.get("delta", {}).get("content")
                                for c in chunk.get("choices", [])):
            ttft = time.perf_counter() - started
        if chunk.get("usage"):
            tokens = int(chunk["usage"]["completion_tokens"])
    total = time.perf_counter() - started
    conn.close()
    return (ttft if ttft is not None else total), total, tokens


def run_level(port: int, key: str, concurrency: int, requests: int,
              max_tokens: int) -> Dict[str, Any]:
    results: List[Tuple[float, float, int]] = []
    errors: List[str] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            try:
                r = one_stream(port, key, max_tokens)
                with lock:
                    results.append(r)
            except Exception as exc:  # reported, and the run fails
                with lock:
                    errors.append(str(exc))
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"local bench: {len(errors)} request(s) failed: {errors[:3]}")
    ttfts = sorted(r[0] * 1000 for r in results)
    tokens = sum(r[2] for r in results)
    per_stream = [r[2] / max(r[1] - r[0], 1e-9) for r in results if r[2] > 1]

    def pct(values: List[float], p: float) -> float:
        return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]
    return {"concurrency": concurrency, "requests": len(results),
            "tokens": tokens, "tokens_per_request": tokens / max(1, len(results)),
            "tokens_per_s": tokens / wall,
            "stream_tokens_per_s": statistics.median(per_stream) if per_stream else 0.0,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99)}


def write_doc(section: str) -> None:
    text = DOC.read_text()
    new = BEGIN + "\n" + section + "\n" + END
    if BEGIN not in text:
        raise SystemExit(f"local bench: {DOC} has no {BEGIN} marker")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: new, text, flags=re.S)
    DOC.write_text(text)


def main() -> int:
    short = os.environ.get("BENCH_SHORT") == "1"
    requests = int(os.environ.get("BENCH_LOCAL_REQUESTS", "16" if short else "48"))
    capacity = int(os.environ.get("BENCH_LOCAL_CAPACITY", "8"))
    max_tokens = int(os.environ.get("BENCH_LOCAL_MAX_TOKENS", "64"))
    procs = Procs(BUILD / "aigw-broker", BUILD / "aigw-testworker")
    try:
        gw = Gateway(procs, [], env={"AIGW_LOCAL_MODELS": "1"}).start()
        worker = procs.start("models", [PYTHON, str(REPO / "python" / "aigw_model_worker.py"),
                                        "--bus", gw.broker.bus, "--models", "tiny",
                                        "--capacity", str(capacity)])
        worker.wait_line(r"ready service=model\.tiny ", timeout=30)
        deadline = time.monotonic() + 10
        while True:  # the router learns local models within ~2 s
            status, _, body = gw.request("GET", "/v1/models")
            if status == 200 and b'"local/tiny"' in body:
                break
            if time.monotonic() > deadline:
                raise SystemExit("local bench: local/tiny never appeared in /v1/models")
            time.sleep(0.1)
        for _ in range(4):  # warm-up: numpy, caches, connections
            one_stream(gw.port, gw.key, max_tokens)
        rows = []
        for concurrency in (1, 8):
            row = run_level(gw.port, gw.key, concurrency, requests, max_tokens)
            print("local-bench " + " ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()), flush=True)
            rows.append(row)
    finally:
        procs.close()

    numpy = subprocess.run([PYTHON, "-c", "import numpy; print(numpy.__version__)"],
                           capture_output=True, text=True).stdout.strip()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    table = ["| concurrency | requests | tokens/request | tokens/s (all streams) "
             "| tokens/s (one stream, p50) | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_request']:.0f} "
                     f"| {r['tokens_per_s']:.0f} | {r['stream_tokens_per_s']:.0f} "
                     f"| {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} |")
    section = (
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} cores ({cpu}), "
        f"{platform.python_implementation()} {platform.python_version()}, numpy {numpy}: "
        f"the tiny model (tiny-llama, random weights) on one model worker "
        f"(--capacity {capacity}), streamed through edge, auth, router and broker on "
        f"loopback, max_tokens {max_tokens} (generation may stop earlier at EOS).\n"
        f"Command: `/usr/bin/python3 tests/bench/local.py` (BENCH_LOCAL_REQUESTS={requests}).\n\n"
        + "\n".join(table))
    write_doc(section)
    print(f"local bench: results written to {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
