"""Exact limits and exact money, end to end (issue 4).

The full gateway (gateway.Gateway: broker, edge, auth, ratelimit, router,
bridge, billing) in front of the mock provider, spoken to over real HTTP and
SSE. What is asserted is what a user or an operator would notice: how many
requests of a burst got through and what the refused ones looked like,
that concurrent requests cannot overshoot a budget and that the budget can
still be spent to the end, that the usage ledger holds exactly one row per
request that reached a provider (also while aigw-billing is killed), what a
disconnected stream costs, that refused requests cost nothing, that a Redis
outage neither hangs the gateway nor outlives Redis, and what GET /v1/usage
reports.

The ledger is read straight from billing's store (Gateway.sql): SQLite in
the gateway's workdir, or PostgreSQL from AIGW_TEST_PG_URL. Redis comes
from AIGW_TEST_REDIS_URL, stopped and restarted through REDISTEST_PORT /
REDISTEST_DIR (tests/harness/services.sh). Without them the tests that need
them skip, or FAIL when AIGW_REQUIRE_SERVICES=1.

The mock's usage is deterministic (docs/MOCK_PROVIDER.md): prompt tokens are
the words of the messages, completion tokens the chunks it sends. Prices are
chosen so one token costs whole micro-units: mock-gpt 1 µ in / 2 µ out,
times the default multiplier 1.5.

Run: tests/harness/services.sh /usr/bin/python3 -m pytest -q -p no:cacheprovider \\
     tests/integration/test_money.py   (with AIGW_BUILD set)
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import RedisControl, require_env, wait_for
from gateway import (KEY, ChunkedReader, Gateway, assert_openai_error, binary, channel,
                     chat, sse_events)

#  USD per 1M tokens, as the price file states them; MICROS the same in
#  micro-units per 1M tokens (input, output), as the store holds them.
PRICES = {"mock-gpt": {"input": 1, "output": 2},
          "mock-gpt-mini": {"input": "0.5", "output": 4},
          "*": {"input": 1, "output": 2}}
MICROS = {"mock-gpt": (1_000_000, 2_000_000), "mock-gpt-mini": (500_000, 4_000_000),
          "*": (1_000_000, 2_000_000)}
KEY2 = "sk-aigw-e2e-second-key-0000000000"
RPM = 100
INTERVAL_S = 60.0 / RPM
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?(ms|s))?$")


# --------------------------------------------------------------------------
# Helpers


def key_id(key: str) -> str:
    """tenant.key: the first 8 hex digits of the key's SHA-256 (ROUTING.md)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def rid_hex(x_request_id: str) -> str:
    """The edge's X-Request-Id (a UUID) as usage_ledger.request_id in hex."""
    return uuid.UUID(x_request_id).hex


def words(text: str) -> int:
    return len(text.split())


def actual_cost(model: str, prompt: int, completion: int, group_milli: int = 1000) -> int:
    """BILLING.md pricing (proto/gw_price.c) with the global multiplier 1.5
    and group_milli (thousandths), no cache: the raw micro-units per 1M
    tokens times both multipliers, over 10^12, rounded once, half up."""
    per_in, per_out = MICROS[model if model in MICROS else "*"]
    raw = prompt * per_in + completion * per_out
    return (raw * 1500 * group_milli + 10**12 // 2) // 10**12


def estimate_cost(content: str, max_tokens: int, model: str = "mock-gpt",
                  group_milli: int = 1000) -> int:
    """LIMITS.md: ceil(bytes / 3) prompt tokens (the strings under messages:
    role and content) plus max_tokens, priced exactly as billing prices
    them, with the group's multiplier."""
    prompt = -(-(len("user") + len(content.encode())) // 3)
    return actual_cost(model, prompt, max_tokens, group_milli)


def to_int(value: Any) -> int:
    if isinstance(value, str):
        flags = {"t": 1, "f": 0, "true": 1, "false": 0}
        return flags[value] if value in flags else int(value)
    return int(value)


def ledger(gw: Gateway) -> Dict[str, Dict[str, Any]]:
    """Every ledger row by request id (hex)."""
    rows = gw.sql(f"SELECT {gw.rid_hex_sql}, key_id, user_name, model, prompt_tokens, "
                  f"completion_tokens, cached_tokens, cost_micros, estimated, status, ts_ms "
                  f"FROM usage_ledger")
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        out[str(r[0])] = {"key": str(r[1]), "user": str(r[2]), "model": str(r[3]),
                          "prompt": to_int(r[4]), "completion": to_int(r[5]),
                          "cached": to_int(r[6]), "cost": to_int(r[7]),
                          "estimated": bool(to_int(r[8])), "status": to_int(r[9]),
                          "ts": to_int(r[10])}
    return out


def ledger_count(gw: Gateway) -> int:
    rows = gw.sql("SELECT count(*) FROM usage_ledger")
    return to_int(rows[0][0]) if rows else 0


def wait_rows(gw: Gateway, rids: List[str], timeout: float = 10.0
              ) -> Dict[str, Dict[str, Any]]:
    """Poll the ledger until every rid (X-Request-Id) has its row."""
    want = {rid_hex(r) for r in rids}
    last: Dict[str, Dict[str, Any]] = {}

    def present() -> bool:
        nonlocal last
        last = ledger(gw)
        return want <= set(last)
    try:
        wait_for(present, timeout, f"{len(want)} ledger row(s)", interval=0.05)
    except AssertionError:
        missing = want - set(last)
        raise AssertionError(
            f"{len(missing)} of {len(want)} requests have no ledger row after {timeout}s "
            f"(ledger holds {len(last)} rows): e.g. {sorted(missing)[:3]}\n"
            f"{gw.logs()}") from None
    return last


def burst(gw: Gateway, bodies: List[Dict[str, Any]], key: Optional[str] = None
          ) -> Tuple[List[Tuple[int, Dict[str, str], bytes]], float]:
    """Send every body at once, one connection each, all connected before the
    first request is written. Returns the responses and the seconds from the
    start signal to the last answer."""
    count = len(bodies)
    gate = threading.Barrier(count + 1)
    results: List[Any] = [None] * count
    hdrs = {"Authorization": f"Bearer {key or gw.key}", "Content-Type": "application/json",
            "Connection": "close"}

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        try:
            conn.connect()
            gate.wait(timeout=30)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(bodies[i]),
                         headers=hdrs)
            resp = conn.getresponse()
            results[i] = (resp.status, {k.lower(): v for k, v in resp.getheaders()},
                          resp.read())
        except Exception as exc:  # reported below, with the others
            results[i] = (0, {}, repr(exc).encode())
        finally:
            conn.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    gate.wait(timeout=30)
    start = time.monotonic()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - start
    broken = [r for r in results if r is None or r[0] == 0]
    assert not broken, f"{len(broken)} requests got no HTTP answer: {broken[:3]}"
    return results, elapsed


def check_ratelimit_headers(headers: Dict[str, str], limit: int, refused: bool) -> int:
    """x-ratelimit-{limit,remaining,reset}-requests as LIMITS.md says;
    returns remaining."""
    assert headers.get("x-ratelimit-limit-requests") == str(limit), headers
    remaining = headers.get("x-ratelimit-remaining-requests", "")
    assert remaining.isdigit() and int(remaining) < limit, headers
    reset = headers.get("x-ratelimit-reset-requests", "")
    assert reset and DURATION.match(reset), headers
    if refused:
        assert remaining == "0", headers
    return int(remaining)


def redis_env() -> Dict[str, str]:
    """A private key prefix: counters of other tests on the same Redis stay
    out of the way."""
    return {"AIGW_RATELIMIT_PREFIX": f"money-{uuid.uuid4().hex[:12]}"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[Optional[str]]:
    """None (the gateway's SQLite default) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    base = require_env("AIGW_TEST_PG_URL")
    name = f"aigw_money_{os.getpid()}_{random.randrange(1 << 30)}"
    subprocess.run(["psql", base, "-X", "-q", "-c", f"CREATE DATABASE {name}"], check=True,
                   capture_output=True, timeout=30)
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        subprocess.run(["psql", base, "-X", "-q", "-c",
                        f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       capture_output=True, timeout=30)


# --------------------------------------------------------------------------
# a. Requests per minute: exact across replicas, OpenAI's refusal


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_rpm_100_admits_exactly_100_of_300(make_mock, make_gateway, backend: str) -> None:
    """RPM 100, burst 100: of 300 simultaneous chat requests exactly 100 get
    a 200 (plus one per 0.6 s the burst took, if it took that long), the rest
    a 429 in OpenAI's shape with Retry-After and the x-ratelimit headers, and
    the provider sees only the admitted ones. Embedded counter with one
    ratelimit replica; Redis with two replicas sharing it."""
    mock = make_mock()
    env = {"RATE_LIMIT_REQUESTS_PER_MINUTE": str(RPM), "RATE_LIMIT_BURST": str(RPM),
           "AIGW_RATELIMIT_CAPACITY": "16"}
    kwargs: Dict[str, Any] = {}
    if backend == "redis":
        kwargs = {"redis_url": require_env("AIGW_TEST_REDIS_URL"),
                  "counts": {"ratelimit": 2},
                  "stage_env": {"ratelimit": {"LOG_LEVEL": "debug"}}}
        env.update(redis_env())
    gw = make_gateway([channel("a", mock)], env=env,
                      edge_env={"AIGW_EDGE_THREADS": "320"}, **kwargs)
    expected_backend = "counters in Redis" if backend == "redis" else "counters in memory"
    assert all(p.has_line(expected_backend) for p in gw.stages["ratelimit"])

    results, elapsed = burst(gw, [chat(content=f"burst {i}", max_tokens=5)
                                  for i in range(300)])
    statuses = [r[0] for r in results]
    admitted = statuses.count(200)
    print(f"{backend}: {admitted} of 300 admitted in {elapsed:.3f}s")
    assert statuses.count(429) + admitted == 300, sorted(set(statuses))
    allowed = int(elapsed / INTERVAL_S)  # refills during a slow burst
    assert RPM <= admitted <= RPM + allowed, (
        f"{admitted} of 300 admitted in {elapsed:.2f}s (limit {RPM}/min, burst {RPM})")
    assert mock.requests() == admitted, "a refused request reached the provider"

    remaining = []
    for status, headers, body in results:
        if status == 200:
            remaining.append(check_ratelimit_headers(headers, RPM, refused=False))
            continue
        err = assert_openai_error(body, status)
        assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded"), err
        assert "rpm" in err["message"] and key_id(KEY) in err["message"], err
        retry = headers.get("retry-after", "")
        assert retry.isdigit() and 1 <= int(retry) <= 60, headers
        check_ratelimit_headers(headers, RPM, refused=True)
        assert headers.get("x-request-id"), headers
    if backend == "redis":
        # Both replicas decided part of the burst, admissions included.
        for proc in gw.stages["ratelimit"]:
            decided = [line for line in list(proc.lines)
                       if "ratelimit: admitted" in line or "ratelimit: refused" in line]
            assert sum("admitted" in line for line in decided) > 0, proc.name
            assert len(decided) >= 20, (proc.name, len(decided))
    # Each admission took one request from the bucket.
    assert min(remaining) == 0
    if allowed == 0:
        assert sorted(remaining) == list(range(RPM)), sorted(remaining)


def test_ratelimit_headers_on_every_success(make_mock, make_gateway) -> None:
    """x-ratelimit-* on 200 responses, streamed and not, counting down; a
    refused stream is a plain 429 with the same headers."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)],
                      env={"RATE_LIMIT_REQUESTS_PER_MINUTE": "3", "RATE_LIMIT_BURST": "3"})
    status, headers, body = gw.chat(max_tokens=5)
    assert status == 200, body
    assert check_ratelimit_headers(headers, 3, refused=False) == 2

    status, headers, body = gw.chat(stream=True, max_tokens=5)
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/event-stream"), headers
    assert sse_events(body.decode())[-1] == (None, "[DONE]")
    assert check_ratelimit_headers(headers, 3, refused=False) == 1, headers

    sock = gw.raw_stream(chat(stream=True, max_tokens=5))
    try:
        reader = ChunkedReader(sock)
        reader.read_head()
        reader.read_all()
    finally:
        sock.close()
    assert reader.status == 200 and reader.complete, reader.body[-200:]
    assert check_ratelimit_headers(reader.headers, 3, refused=False) == 0, reader.headers

    status, headers, body = gw.chat(stream=True, max_tokens=5)
    assert status == 429, body
    assert assert_openai_error(body)["code"] == "rate_limit_exceeded"
    check_ratelimit_headers(headers, 3, refused=True)
    assert headers.get("retry-after", "").isdigit(), headers
    assert mock.requests() == 3


# --------------------------------------------------------------------------
# b. A budget: never overshot, fully usable


@pytest.mark.parametrize("prices_from", ["file", "store"])
def test_budget_is_never_overshot_and_fully_usable(make_mock, make_gateway, tmp_path,
                                                   prices_from: str) -> None:
    """Budget N for the key; every request holds its estimate (prompt bytes/3
    + max_tokens, priced). 40 concurrent requests: exactly N // estimate are
    admitted (holds: none beyond; atomic: none fewer) and their billed sum is
    within N although every one of the 40 would have been billed had the
    check come before the charge. Billing then settles each hold to the
    actual cost, so further requests are admitted until what is left of N
    is less than one estimate. The prices come from AIGW_PRICES_FILE, or only
    from the store (set with aigw-admin, no price file anywhere): ratelimit
    must hold at the price billing charges either way."""
    content = " ".join(["ab"] * 20)  # 20 words; 4 + 59 bytes -> 21 tokens estimated
    max_tokens = 200
    est = estimate_cost(content, max_tokens)
    assert est == 632  # (21 x 1 + 200 x 2) x 1.5, rounded half up
    first = actual_cost("mock-gpt", 20, 150)
    budget = 4 * est + 300
    mock = make_mock()
    # The provider holds every answer 500 ms, so no request of wave 1 is
    # settled (giving back part of its hold) before all 40 are decided.
    mock.config(chunks=150, latency_ms=500)
    store: Dict[str, Any] = {}
    if prices_from == "store":
        db = tmp_path / "admin-priced.db"
        for model, price in PRICES.items():
            admin(str(db), "price", "set", model, str(int(float(price["input"]) * 10**6)),
                  str(int(float(price["output"]) * 10**6)))
        store = {"database_url": f"sqlite://{db}"}
    gw = make_gateway([channel("a", mock)], prices=PRICES if prices_from == "file" else None,
                      limits={"defaults": {"key": {"budget": budget}}}, **store)

    # Wave 1: 40 at once.
    results, elapsed = burst(gw, [chat(content=content, max_tokens=max_tokens)
                                  for _ in range(40)])
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == budget // est == 4, (
        f"{len(ok)} of 40 concurrent requests admitted; budget {budget} allows "
        f"{budget // est} holds of {est}")
    for status, headers, body in results:
        if status != 200:
            assert status == 429, body
            err = assert_openai_error(body, status)
            assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
            assert "retry-after" not in headers, headers
    rows = wait_rows(gw, [h["x-request-id"] for _, h, _ in ok])
    assert len(rows) == 4, f"{len(rows)} ledger rows for 4 admitted requests"
    for row in rows.values():
        assert (row["prompt"], row["completion"], row["cost"]) == (20, 150, first), row
    assert sum(r["cost"] for r in rows.values()) <= budget

    # Wave 2: cheap requests (the same hold, 2 tokens of output really
    # produced) one by one until refused with the ledger showing the budget
    # used up. A refusal while a settle is still on its way is retried.
    mock.config(chunks=2, latency_ms=0)
    cheap = actual_cost("mock-gpt", 20, 2)
    admitted, refusals, spent = 0, 0, 0
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, (
            f"budget not usable: admitted {admitted} after wave 1, spent {spent} of "
            f"{budget}, {refusals} refusals")
        status, headers, body = gw.chat(content=content, max_tokens=max_tokens)
        if status == 200:
            admitted += 1
            assert admitted < 100, "the budget is not enforced"
            continue
        assert status == 429, body
        assert assert_openai_error(body)["code"] == "insufficient_quota"
        refusals += 1
        rows = ledger(gw)
        if len(rows) < 4 + admitted:
            time.sleep(0.02)
            continue
        spent = sum(r["cost"] for r in rows.values())
        if budget - spent < est:
            break
        time.sleep(0.05)  # holds not settled yet: try again
    rows = ledger(gw)
    spent = sum(r["cost"] for r in rows.values())
    print(f"budget {budget}: hold {est}, wave 1 4 x {first}, then {admitted} x {cheap}; "
          f"spent {spent}, {refusals} refusal(s) in wave 2")
    assert len(rows) == 4 + admitted
    assert spent == 4 * first + admitted * cheap, rows
    assert 0 <= budget - spent < est, f"spent {spent} of {budget} (hold {est})"
    # (budget - 4 x first - est) // cheap + 1 requests fit after wave 1.
    assert admitted == (budget - 4 * first - est) // cheap + 1


def admin(db: str, *args: str) -> str:
    """aigw-admin --db db args (must succeed); its stdout."""
    result = subprocess.run([str(binary("admin")), "--db", db, *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def test_group_multiplier_holds_never_overshoot_the_budget(make_mock, make_gateway,
                                                           tmp_path) -> None:
    """User carol of group "vip", whose price multiplier is 3.0 (set with
    aigw-admin in billing's store), has a budget of four holds and a bit.
    Billing charges her usage ×3; ratelimit must hold ×3 too. 40 concurrent
    requests, each answered only after 500 ms so none is settled before all
    are decided: exactly four are admitted and the ledger — priced by
    billing, group vip — stays within the budget. Holds priced at 1.0 would
    admit about twelve and the ledger would hold three times the budget.
    Then cheap requests one by one until refused: spent never passes the
    budget, and what is left is less than one hold."""
    db = f"sqlite://{tmp_path / 'vip.db'}"
    assert admin(db, "group", "set", "vip", "3").strip() == "vip multiplier 3.000"
    key = admin(db, "key", "add", "--user", "carol", "--group", "vip").strip()
    content = " ".join(["ab"] * 20)  # 21 tokens estimated, 20 words
    max_tokens = 200
    est = estimate_cost(content, max_tokens, group_milli=3000)
    assert est == 1895  # (21 x 1 + 200 x 2) x 1.5 x 3 = 1894.5, half up
    first = actual_cost("mock-gpt", 20, 150, group_milli=3000)
    budget = 4 * est + 300
    mock = make_mock()
    mock.config(chunks=150, latency_ms=500)
    gw = make_gateway([channel("a", mock)], prices=PRICES, database_url=db,
                      limits={"users": {"carol": {"budget": budget}}})

    results, _ = burst(gw, [chat(content=content, max_tokens=max_tokens)
                            for _ in range(40)], key=key)
    ok = [r for r in results if r[0] == 200]
    for status, headers, body in results:
        if status != 200:
            assert status == 429, body
            err = assert_openai_error(body, status)
            assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
    assert len(ok) == budget // est == 4, (
        f"{len(ok)} of 40 concurrent requests admitted; budget {budget} allows "
        f"{budget // est} holds of {est} (group multiplier 3.0)")
    rows = wait_rows(gw, [h["x-request-id"] for _, h, _ in ok])
    assert len(rows) == 4
    for row in rows.values():
        assert (row["user"], row["prompt"], row["completion"], row["cost"]) == (
            "carol", 20, 150, first), row
    groups = gw.sql("SELECT DISTINCT group_name FROM usage_ledger")
    assert [str(g[0]) for g in groups] == ["vip"], groups
    assert sum(r["cost"] for r in rows.values()) <= budget

    # Cheap requests (the same hold, 2 tokens really produced) until refused
    # with less than one hold left; a refusal while a settle is on its way
    # is retried.
    mock.config(chunks=2, latency_ms=0)
    admitted, refusals = 0, 0
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, f"budget not usable: admitted {admitted}"
        status, _, body = gw.request("POST", "/v1/chat/completions",
                                     chat(content=content, max_tokens=max_tokens), key=key)
        spent = sum(r["cost"] for r in ledger(gw).values())
        assert spent <= budget, f"spent {spent} of a budget of {budget}"
        if status == 200:
            admitted += 1
            assert admitted < 100, "the budget is not enforced"
            continue
        assert status == 429, body
        assert assert_openai_error(body)["code"] == "insufficient_quota"
        refusals += 1
        rows = ledger(gw)
        if len(rows) < 4 + admitted:
            time.sleep(0.02)
            continue
        if budget - sum(r["cost"] for r in rows.values()) < est:
            break
        time.sleep(0.05)
    rows = ledger(gw)
    spent = sum(r["cost"] for r in rows.values())
    cheap = actual_cost("mock-gpt", 20, 2, group_milli=3000)
    assert spent == 4 * first + admitted * cheap, rows
    assert 0 <= budget - spent < est, f"spent {spent} of {budget} (hold {est})"
    print(f"group vip x3, budget {budget}: hold {est}, 4 x {first} at once, then "
          f"{admitted} x {cheap}; spent {spent}, {refusals} refusal(s)")


# --------------------------------------------------------------------------
# b2. The prepaid balance (AIGW_ENFORCE_BALANCE=1): never overshot, refilled


def test_balance_is_never_overshot_and_credit_reopens(make_mock, make_gateway) -> None:
    """User "default" (the static key's user) holds N micro-units in billing's
    store; ratelimit enforces it (AIGW_ENFORCE_BALANCE=1, same DATABASE_URL).
    40 concurrent requests: exactly N // estimate are admitted (holds) and
    their billed sum is within N. Then requests one by one until refused
    with insufficient_quota and less than one estimate left: the ledger never
    exceeds N and the store's balance is N minus the ledger. Crediting more
    with aigw-admin lets requests through again within about 2 s."""
    content = " ".join(["ab"] * 20)
    max_tokens = 200
    est = estimate_cost(content, max_tokens)
    assert est == 632
    first = actual_cost("mock-gpt", 20, 150)
    funds = 4 * est + 300
    mock = make_mock()
    mock.config(chunks=150, latency_ms=500)
    gw = make_gateway([channel("a", mock)], prices=PRICES,
                      stage_env={"ratelimit": {"AIGW_ENFORCE_BALANCE": "1"}})
    if gw.sqlite_path is None:
        pytest.skip("seeds the balance through SQLite")
    db = gw.sqlite_path

    def write(query: str, *args: Any) -> None:
        conn = sqlite3.connect(db, timeout=10)
        try:
            with conn:
                conn.execute(query, args)
        finally:
            conn.close()

    def balance() -> int:
        rows = gw.sql("SELECT balance_micros FROM users WHERE name = 'default'")
        return to_int(rows[0][0]) if rows else 0

    wait_for(lambda: bool(gw.sql("SELECT name FROM sqlite_master WHERE name = 'users'")),
             10, "billing's store")
    write("INSERT INTO users (name, balance_micros, created_ms) VALUES ('default', ?, ?) "
          "ON CONFLICT (name) DO UPDATE SET balance_micros = excluded.balance_micros",
          funds, int(time.time() * 1000))

    # Wave 1: 40 at once; the balance admits exactly funds // est holds.
    results, _ = burst(gw, [chat(content=content, max_tokens=max_tokens)
                            for _ in range(40)])
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == funds // est == 4, (
        f"{len(ok)} of 40 concurrent requests admitted; balance {funds} allows "
        f"{funds // est} holds of {est}\n{gw.logs()[-3000:]}")
    for status, headers, body in results:
        if status != 200:
            assert status == 429, body
            err = assert_openai_error(body, status)
            assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
    rows = wait_rows(gw, [h["x-request-id"] for _, h, _ in ok])
    assert sum(r["cost"] for r in rows.values()) == 4 * first <= funds

    # Wave 2: cheap requests one by one until the balance cannot cover a hold.
    mock.config(chunks=2, latency_ms=0)
    admitted, refusals = 0, 0
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, (
            f"balance not usable: admitted {admitted}, balance {balance()}, "
            f"{refusals} refusals")
        status, _, body = gw.chat(content=content, max_tokens=max_tokens)
        spent = sum(r["cost"] for r in ledger(gw).values())
        assert spent <= funds, f"spent {spent} of a balance of {funds}"
        if status == 200:
            admitted += 1
            assert admitted < 100, "the balance is not enforced"
            continue
        assert status == 429, body
        err = assert_openai_error(body)
        assert (err["type"], err["code"]) == ("insufficient_quota", "insufficient_quota")
        refusals += 1
        rows = ledger(gw)
        if len(rows) < 4 + admitted:
            time.sleep(0.05)
            continue
        spent = sum(r["cost"] for r in rows.values())
        if funds - spent < est:
            break
        time.sleep(0.1)  # settled cost not refreshed yet (≤ 1 s): try again
    rows = ledger(gw)
    spent = sum(r["cost"] for r in rows.values())
    assert len(rows) == 4 + admitted
    assert 0 <= funds - spent < est, f"spent {spent} of {funds} (hold {est})"
    assert balance() == funds - spent
    assert admitted >= 1, "the settled holds were never given back"

    # Still refused while nothing changes; then a credit reopens within ~2 s.
    status, _, body = gw.chat(content=content, max_tokens=max_tokens)
    assert status == 429 and assert_openai_error(body)["code"] == "insufficient_quota"
    subprocess.run([str(binary("admin")), "--db", db, "user", "credit", "default",
                    str(10 * est)], check=True, capture_output=True, timeout=30)
    credited = time.monotonic()
    while True:
        status, _, body = gw.chat(content=content, max_tokens=max_tokens)
        if status == 200:
            break
        assert status == 429, body
        assert time.monotonic() - credited < 2.5, "a credit did not reopen the balance"
        time.sleep(0.05)
    print(f"balance {funds}: wave 1 4 x {first}, then {admitted} more; spent {spent}, "
          f"{refusals} refusal(s); credit admitted after "
          f"{time.monotonic() - credited:.2f} s")


# --------------------------------------------------------------------------
# c. Exactly once while aigw-billing is killed


def test_ledger_exactly_once_while_billing_is_killed(make_mock, make_gateway,
                                                     database_url: Optional[str]) -> None:
    """2,000 requests, 16 at a time, while aigw-billing is SIGKILLed three
    times and restarted (once after a pause longer than the broker's
    expiry, so the producer must spool and resend). Clients see only 200s;
    afterwards the ledger holds exactly one row per answered request, keyed
    by its X-Request-Id, priced from the provider's usage, and every
    balance is minus the sum of its user's rows."""
    total, concurrency = 2000, 16
    kills = [(0.1, 0.05), (0.3, 1.2), (0.75, 0.1)]  # (share answered, pause s)
    mock = make_mock()
    mock.config(latency_ms=20)  # over 2.5 s of load: room for three kills
    gw = make_gateway([channel("a", mock)], prices=PRICES, database_url=database_url)
    answered = [0]
    lock = threading.Lock()
    kill_times: List[float] = []

    def one(i: int) -> Tuple[int, str, float]:
        content = f"request number {i} " + "x " * (i % 7)
        status, headers, body = gw.chat(content=content)
        with lock:
            answered[0] += 1
        return status, headers.get("x-request-id", ""), time.monotonic()

    def killer() -> None:
        for share, pause in kills:
            wait_for(lambda: answered[0] >= share * total, 60, f"{share:.0%} answered")
            kill_times.append(time.monotonic())
            gw.kill("billing", 0)
            time.sleep(pause)
            gw.restart("billing", 0)
    thread = threading.Thread(target=killer)
    thread.start()
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(total)))
    thread.join(timeout=60)
    elapsed = time.monotonic() - began
    assert len(kill_times) == len(kills), "the killer did not finish"
    assert max(t for _, _, t in results) > kill_times[-1], "load ended before the last kill"
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)} requests failed while billing was killed: {bad[:5]}"

    # The spool drains: wait until the ledger has a row for every request.
    wait_for(lambda: ledger_count(gw) >= total, 20,
             f"the ledger to reach {total} rows (spool drained)", interval=0.2)
    rows = ledger(gw)
    want = {rid_hex(rid) for _, rid, _ in results}
    assert len(want) == total, "X-Request-Id repeated"
    assert ledger_count(gw) == len(rows) == total, f"{len(rows)} rows for {total} requests"
    assert set(rows) == want, (f"{len(want - set(rows))} requests without a row, "
                               f"{len(set(rows) - want)} rows of no request")
    for i, (_, rid, _) in enumerate(results):
        row = rows[rid_hex(rid)]
        prompt = 3 + i % 7
        assert (row["model"], row["prompt"], row["completion"], row["estimated"]) == (
            "mock-gpt", prompt, 5, False), (i, row)
        assert row["cost"] == actual_cost("mock-gpt", prompt, 5), (i, row)
        assert row["key"] == key_id(KEY), row
    spent: Dict[str, int] = {}
    for row in rows.values():
        spent[row["user"]] = spent.get(row["user"], 0) + row["cost"]
    balances = {str(n): to_int(b) for n, b in gw.sql("SELECT name, balance_micros FROM users")}
    assert {u: balances.get(u) for u in spent} == {u: -c for u, c in spent.items()}, balances
    assert all(b == 0 for u, b in balances.items() if u not in spent), balances
    print(f"{total} requests in {elapsed:.1f}s, {len(kills)} SIGKILLs of billing, "
          f"{len(rows)} ledger rows, spent {spent}")


def test_bridge_crash_spool_is_taken_over_and_billed_once(make_mock, make_gateway) -> None:
    """Billing is down while 300 requests are served (16 at a time, so the
    bridge's usage events pile up in its spool and go out in batches); the
    bridge is SIGKILLed with every event owed; a new bridge on the same
    spool folder takes the dead one's file over, and once billing is back
    every request has exactly one ledger row, priced from the provider's
    usage (docs/BILLING.md, "Restart and takeover")."""
    total = 300
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], prices=PRICES)
    gw.kill("billing", 0)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda i: gw.chat(content=f"takeover number {i} " + "x " * (i % 7)),
                                range(total)))
    assert [r[0] for r in results] == [200] * total
    ids = [r[1].get("x-request-id", "") for r in results]
    time.sleep(0.3)  # the last events reach the spool file
    spool = [f for f in os.listdir(gw.spool_dir) if f.endswith(".spool")]
    assert len(spool) == 1 and os.path.getsize(os.path.join(gw.spool_dir, spool[0])) > 8
    gw.kill("bridge", 0)
    gw.restart("bridge", 0)
    gw.restart("billing", 0)
    wait_for(lambda: ledger_count(gw) >= total, 30,
             f"the ledger to reach {total} rows (spool taken over)", interval=0.2)
    time.sleep(0.5)  # nothing more may arrive
    rows = ledger(gw)
    assert ledger_count(gw) == len(rows) == total
    assert set(rows) == {rid_hex(i) for i in ids}
    for i, x_request_id in enumerate(ids):
        row = rows[rid_hex(x_request_id)]
        assert row["cost"] == actual_cost("mock-gpt", 3 + i % 7, 5), (i, row)
    # The dead bridge's file is gone; the new one drained its own.
    wait_for(lambda: spool[0] not in os.listdir(gw.spool_dir), 5, "old spool deleted")


# --------------------------------------------------------------------------
# d. A client that leaves mid-stream


@pytest.mark.parametrize("mode", ["drain", "cancel"])
def test_disconnect_mid_stream_is_billed(make_mock, make_gateway, mode: str) -> None:
    """The client reads two tokens of a 40-token stream and hangs up. drain:
    the bridge reads the stream to its end and the ledger has the
    provider's usage (40 completion tokens), not estimated. cancel (the
    default): the upstream transfer stops within a second, and the row is
    marked estimated, with at least the tokens the client saw and at most
    those the provider had sent when it was cut off."""
    mock = make_mock()
    mock.config(chunks=40, chunk_delay_ms=40)
    env = {"AIGW_DISCONNECT": mode} if mode == "drain" else {}
    gw = make_gateway([channel("a", mock)], prices=PRICES, env=env)
    content = "please tell a long story"
    sock = gw.raw_stream(chat(content=content, stream=True, max_tokens=100))
    try:
        reader = ChunkedReader(sock)
        reader.read_head()
        assert reader.status == 200, reader.headers
        rid = reader.headers["x-request-id"]
        seen = 0
        while seen < 2:
            assert reader.read_chunk() is not None, reader.body
            seen = sum(1 for name, data in sse_events(reader.body.decode())
                       if data.startswith("{") and any(
                           c.get("delta", {}).get("content")
                           for c in json.loads(data).get("choices", [])))
        hung_up = time.time()
    finally:
        sock.close()

    rows = wait_rows(gw, [rid], timeout=10)
    row = rows[rid_hex(rid)]
    print(f"{mode}: client saw {seen} tokens; ledger {row}")
    assert row["model"] == "mock-gpt" and row["key"] == key_id(KEY), row
    disconnects = [d for d in mock.stats()["disconnects"] if d["phase"] == "streaming"]
    if mode == "drain":
        assert (row["prompt"], row["completion"], row["estimated"]) == (
            words(content), 40, False), row
        assert row["cost"] == actual_cost("mock-gpt", words(content), 40), row
        assert not disconnects, f"drain mode cut the upstream stream: {disconnects}"
        assert mock.stats()["active_streams"] == 0
    else:
        assert row["estimated"] is True, row
        assert seen <= row["completion"] <= 40, row
        assert row["prompt"] > 0, row
        # Nobody pays for tokens nobody reads: the provider saw the hang-up
        # within a second, long before its 40 x 40 ms stream would have ended.
        wait_for(lambda: [d for d in mock.stats()["disconnects"]
                          if d["phase"] == "streaming"], 2.0, "the upstream to be cancelled")
        cut = [d for d in mock.stats()["disconnects"] if d["phase"] == "streaming"][0]
        assert cut["chunks_sent"] < 40, cut
        # Not billed for more than the provider sent.
        assert row["completion"] <= cut["chunks_sent"], (row, cut)
        print(f"cancel: the provider had sent {cut['chunks_sent']} tokens")
        assert cut["at"] - hung_up < 1.0, cut


def test_hang_up_before_the_first_byte_is_counted_once(make_mock, make_gateway) -> None:
    """The client hangs up while the provider still thinks (before the first
    byte of the stream). The edge cannot tell that the request reached the
    provider, so it releases the hold; the bridge bills it anyway (499,
    estimated), and billing's settle comes after the release. The limiter
    must still count that cost: the key's budget counter in Redis ends
    equal to the ledger's cost for the request, not at 0."""
    url = require_env("AIGW_TEST_REDIS_URL")
    env = redis_env()
    mock = make_mock()
    mock.config(latency_ms=1500)
    gw = make_gateway([channel("a", mock)], prices=PRICES, redis_url=url, env=env,
                      limits={"defaults": {"key": {"budget": 10**9}}})
    counter = f"{{{env['AIGW_RATELIMIT_PREFIX']}}}:rl:bg:key:{key_id(KEY)}"

    def spent() -> int:
        out = subprocess.run(["redis-cli", "-u", url, "GET", counter], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return int(out) if out else 0

    sock = gw.raw_stream(chat(content="please count to three", stream=True, max_tokens=100))
    try:
        wait_for(lambda: mock.requests() == 1, 5, "the request to reach the provider")
        assert spent() > 0  # the hold
    finally:
        sock.close()
    rows: Dict[str, Dict[str, Any]] = {}

    def billed() -> bool:
        rows.update(ledger(gw))
        return bool(rows)
    wait_for(billed, 10, "the ledger row of the request the client left")
    (row,) = rows.values()
    assert (row["status"], row["estimated"]) == (499, True), row
    assert row["cost"] > 0, row
    try:
        wait_for(lambda: spent() == row["cost"], 5, "the budget counter to reach the cost")
    except AssertionError:
        raise AssertionError(f"budget counter {spent()}, ledger cost {row['cost']}: the "
                             f"settle after the release was lost\n{gw.logs()[-3000:]}")
    print(f"hang-up before the first byte: ledger {row['cost']}, counter {spent()}")


# --------------------------------------------------------------------------
# e. Refused requests cost nothing


def test_ratelimit_refusal_is_not_billed(make_mock, make_gateway) -> None:
    """RPM 2: the third request of a key is refused by ratelimit and has no
    ledger row, while the two admitted ones (and another key's request sent
    after the refusal) do."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], keys=(KEY, KEY2), prices=PRICES,
                      env={"RATE_LIMIT_REQUESTS_PER_MINUTE": "2", "RATE_LIMIT_BURST": "2"})
    answers = [gw.request("POST", "/v1/chat/completions", chat(content=f"r {i}"))
               for i in range(3)]
    assert [a[0] for a in answers] == [200, 200, 429], [a[2] for a in answers]
    refused = answers[2][1]["x-request-id"]
    status, headers, body = gw.request("POST", "/v1/chat/completions", chat(), key=KEY2)
    assert status == 200, body
    admitted = [a[1]["x-request-id"] for a in answers[:2]] + [headers["x-request-id"]]
    rows = wait_rows(gw, admitted)
    assert rid_hex(refused) not in rows, rows[rid_hex(refused)]
    assert len(rows) == 3 and mock.requests() == 3, rows


def test_router_refusal_is_not_billed_and_releases_hold_and_lease(make_mock,
                                                                  make_gateway) -> None:
    """Concurrency 1 and a budget of one and a half holds per key. A request
    for an unknown model passes ratelimit (taking the lease and a hold) and is
    refused by the router with 404 (still with the x-ratelimit headers):
    the edge releases both, so the next
    request is admitted at once instead of after the lease's expiry (its
    deadline + 60 s); the 404 has no ledger row."""
    content = "hello there world"
    est = estimate_cost(content, 50)
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], prices=PRICES,
                      limits={"defaults": {"key": {"concurrency": 1, "rpm": 100,
                                                   "budget": est + est // 2}}})

    def admitted_within(limit: float) -> Tuple[float, List[str], Any]:
        """Time until a request is admitted (429s on the way)."""
        start, refusals = time.monotonic(), []
        while True:
            status, headers, body = gw.chat(content=content, max_tokens=50)
            waited = time.monotonic() - start
            if status == 200:
                return waited, refusals, headers
            assert status == 429, body
            refusals.append(assert_openai_error(body)["code"])
            assert waited < limit, (
                f"no request admitted within {limit}s; refusals {refusals}")
            time.sleep(0.02)

    status, headers, body = gw.chat(model="no-such-model", content=content, max_tokens=50)
    assert status == 404, body
    assert assert_openai_error(body)["code"] == "model_not_found"
    check_ratelimit_headers(headers, 100, refused=False)  # the router's FINAL has them too
    lost = headers["x-request-id"]
    waited, refusals, ok = admitted_within(1.0)
    print(f"after the 404: admitted after {waited:.3f}s, refusals {refusals}")
    rows = wait_rows(gw, [ok["x-request-id"]])
    assert rid_hex(lost) not in rows and len(rows) == 1, rows
    assert mock.requests() == 1


def test_sequential_requests_never_exceed_concurrency_1(make_mock, make_gateway) -> None:
    """Concurrency 1 per key: a client that waits for each answer before it
    sends the next never has two requests in flight, so none of 20
    sequential requests (plain and streamed) may be refused. The lease must
    be given back when the response ends (issue 4: "a lease released at
    FINAL"), not only when billing's settle comes round."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], prices=PRICES,
                      limits={"defaults": {"key": {"concurrency": 1}}})
    problems = []
    # Two at once is one too many; the refusal says which limit, in its units.
    mock.config(latency_ms=300)
    results, _ = burst(gw, [chat(content="together"), chat(content="together")])
    assert sorted(r[0] for r in results) == [200, 429], [r[2] for r in results]
    refusal = next(r for r in results if r[0] == 429)
    err = assert_openai_error(refusal[2], 429)
    assert err["code"] == "rate_limit_exceeded" and "concurrency" in err["message"], err
    assert refusal[1].get("retry-after") == "1", refusal[1]
    if "micro-units" in err["message"]:
        problems.append(f"concurrency refusal counts in money: {err['message']!r}")
    mock.config(latency_ms=0)
    wait_for(lambda: gw.chat(content="settled?")[0] == 200, 3, "the lease to come back")
    # One at a time, never refused.
    statuses = []
    for i in range(20):
        status, headers, body = gw.chat(content=f"one at a time {i}", stream=i % 2 == 1,
                                        max_tokens=20)
        statuses.append(status if status == 200 else (status, body[:100]))
    refused = [s for s in statuses if s != 200]
    if refused:
        problems.append(f"{len(refused)} of 20 sequential requests refused: {refused[:2]}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# f. Redis stopped mid-load


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_outage_mid_load(make_mock, make_gateway, redis_ctl: RedisControl,
                               mode: str) -> None:
    """Four clients keep sending while Redis is stopped for 1.5 s and started
    again. Every request is answered within a second; during the outage
    every answer is a 429 with Retry-After 1 (closed) or a 200 (open);
    after Redis is back, requests pass again within a few seconds, and the
    ratelimit log says when the outage began and ended. The ledger has a row
    for every 200 and none for a 429."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], redis_url=require_env("AIGW_TEST_REDIS_URL"),
                      env=dict(redis_env(), RATE_LIMIT_REQUESTS_PER_MINUTE="1000000",
                               RATE_LIMIT_BURST="1000000", AIGW_RATELIMIT_FAIL=mode,
                               AIGW_REDIS_TIMEOUT_MS="50"))
    log: List[Tuple[float, float, int, Dict[str, str], bytes]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status, headers, body = gw.chat(max_tokens=5)
            except OSError as exc:
                status, headers, body = 0, {}, repr(exc).encode()
            with lock:
                log.append((t0, time.monotonic(), status, headers, body))
            if status == 0:
                return
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        redis_ctl.stop()
        down = time.monotonic()
        time.sleep(1.5)
        up_begin = time.monotonic()
        redis_ctl.start()
        up = time.monotonic()

        # Failing open, requests pass all along: what shows the recovery is
        # the limiter's own log line (it retries Redis when a request comes).
        ratelimit = gw.stages["ratelimit"][0]

        def passing_again() -> bool:
            with lock:
                recent = [e for e in log if e[0] > up + 0.2]
            return (len(recent) >= 20 and all(e[2] == 200 for e in recent[-20:])
                    and ratelimit.has_line(r"Redis .* available again after"))
        wait_for(passing_again, 6, "requests to pass again after Redis returned",
                 interval=0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)

    slow = [(round(e[1] - e[0], 3), e[2]) for e in log if e[1] - e[0] >= 1.0 or e[2] == 0]
    assert not slow, f"requests not answered within 1 s (or at all): {slow[:5]}"
    before = [e for e in log if e[1] < down - 0.3]
    during = [e for e in log if e[0] > down and e[1] < up_begin]
    assert before and all(e[2] == 200 for e in before), [e[2] for e in before]
    assert len(during) >= 10, f"only {len(during)} requests during the outage"
    if mode == "closed":
        assert all(e[2] == 429 for e in during), sorted({e[2] for e in during})
        for _, _, _, headers, body in during:
            err = assert_openai_error(body, 429)
            assert err["code"] == "rate_limit_exceeded", err
            assert headers.get("retry-after") == "1", headers
    else:
        assert all(e[2] == 200 for e in during), sorted({e[2] for e in during})
    # What passed is billed, what was refused is not.
    passed = [e[3]["x-request-id"] for e in log if e[2] == 200]
    rows = wait_rows(gw, passed)
    assert len(rows) == len(passed), f"{len(rows)} ledger rows for {len(passed)} 200s"
    output = gw.stages["ratelimit"][0].output()
    assert re.search(r"Redis .*unavailable.*failing " + mode.upper(), output), output
    assert re.search(r"Redis .* available again after", output), output
    print(f"{mode}: {len(before)} before, {len(during)} during, {len(log)} in all")


# --------------------------------------------------------------------------
# g. GET /v1/usage


def test_usage_endpoint_matches_the_ledger(make_mock, make_gateway) -> None:
    """GET /v1/usage for the caller's key: totals and per-model rows equal the
    ledger's rows of that key, for everything and for a time range on each
    side of a second boundary (from/to in unix seconds, half-open); another
    key's usage is not included; a bad key gets 401."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], keys=(KEY, KEY2), prices=PRICES)
    early = [("mock-gpt", KEY, "one two three"), ("mock-gpt-mini", KEY, "four five"),
             ("mock-gpt", KEY2, "six")]
    late = [("mock-gpt", KEY, "seven eight nine ten"), ("mock-gpt-mini", KEY, "eleven")]

    def send(plan: List[Tuple[str, str, str]]) -> List[str]:
        rids = []
        for model, key, content in plan:
            status, headers, body = gw.request("POST", "/v1/chat/completions",
                                               chat(model=model, content=content), key=key)
            assert status == 200, body
            rids.append(headers["x-request-id"])
        return rids
    early_rids = send(early)
    rows = wait_rows(gw, early_rids)
    # The next requests complete in a later second than every early one.
    boundary = max(r["ts"] for r in rows.values()) // 1000 + 1
    wait_for(lambda: time.time() >= boundary + 0.01, 2, "the next second", interval=0.01)
    rows = wait_rows(gw, early_rids + send(late))
    mine = [r for r in rows.values() if r["key"] == key_id(KEY)]
    assert len(mine) == 4 and len(rows) == 5

    def expect(selected: List[Dict[str, Any]]) -> Dict[str, Any]:
        models: Dict[str, Dict[str, int]] = {}
        for r in selected:
            m = models.setdefault(r["model"], {"requests": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0, "cached_tokens": 0,
                                               "cost": 0})
            m["requests"] += 1
            m["prompt_tokens"] += r["prompt"]
            m["completion_tokens"] += r["completion"]
            m["cached_tokens"] += r["cached"]
            m["cost"] += r["cost"]
        totals = {f: sum(m[f] for m in models.values())
                  for f in ("requests", "prompt_tokens", "completion_tokens",
                            "cached_tokens", "cost")}
        return {"totals": totals, "models": models}

    def usage(query: str = "", key: str = KEY) -> Dict[str, Any]:
        status, headers, body = gw.request("GET", "/v1/usage" + query, key=key)
        assert status == 200, body
        obj = json.loads(body)
        assert obj.get("object") == "usage", obj
        models = {m["model"]: {f: m[f] for f in ("requests", "prompt_tokens",
                                                 "completion_tokens", "cached_tokens",
                                                 "cost")} for m in obj["models"]}
        assert len(models) == len(obj["models"]), obj
        totals = {f: obj[f] for f in ("requests", "prompt_tokens", "completion_tokens",
                                      "cached_tokens", "cost")}
        return {"totals": totals, "models": models, "raw": obj}

    got = usage()
    assert got["raw"].get("key") == key_id(KEY), got["raw"]
    assert {k: got[k] for k in ("totals", "models")} == expect(mine), got["raw"]
    assert got["totals"]["cost"] == sum(r["cost"] for r in mine) > 0
    assert set(got["models"]) == {"mock-gpt", "mock-gpt-mini"}
    # [from, to) in unix seconds, on each side of the boundary.
    before = [r for r in mine if r["ts"] < boundary * 1000]
    after = [r for r in mine if r["ts"] >= boundary * 1000]
    assert len(before) == 2 and len(after) == 2
    got = usage(f"?from={boundary}")
    assert {k: got[k] for k in ("totals", "models")} == expect(after), got["raw"]
    got = usage(f"?from={boundary - 3600}&to={boundary}")
    assert {k: got[k] for k in ("totals", "models")} == expect(before), got["raw"]
    got = usage(f"?to={min(r['ts'] for r in mine) // 1000}")
    assert got["totals"]["requests"] == 0 and not got["models"], got["raw"]
    # The other key sees only its own.
    got = usage(key=KEY2)
    assert {k: got[k] for k in ("totals", "models")} == expect(
        [r for r in rows.values() if r["key"] == key_id(KEY2)]), got["raw"]
    status, _, body = gw.request("GET", "/v1/usage", key="sk-wrong")
    assert status == 401, body
    status, _, body = gw.request("GET", "/v1/usage?from=yesterday")
    assert status == 400, body
    assert_openai_error(body, 400)
