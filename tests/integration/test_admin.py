"""aigw-admin against the whole gateway: a key made with the CLI works over
HTTP at once, stops working within the auth cache window (1 s) once
revoked, and credits and prices land in billing's store.

Run: AIGW_BUILD=$PWD/build AIGW_TESTDATA=../shared/testdata \
     /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_admin.py
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from typing import Any, List

import pytest

from conftest import BUILD
from gateway import KEY, MODEL, assert_openai_error, channel, chat

ADMIN = BUILD / "aigw-admin"


def admin(db: str, *args: str, check: int = 0) -> subprocess.CompletedProcess:
    """Run aigw-admin --db db args; assert its exit status is check."""
    result = subprocess.run([str(ADMIN), "--db", db, *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == check, (args, result.returncode, result.stdout,
                                        result.stderr)
    return result


def add_key(db: str, *args: str) -> str:
    out = admin(db, "key", "add", *args).stdout
    lines = out.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"sk-aigw-[0-9a-f]{40}", lines[0]), out
    return lines[0]


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@pytest.fixture
def gw(make_gateway: Any, make_mock: Any) -> Any:
    return make_gateway([channel("a", make_mock("a"))])


def test_admin_key_works_then_revoked(gw: Any) -> None:
    db = gw.database_url
    key = add_key(db, "--user", "alice", "--group", "team", "--name", "laptop")
    #  Only the digest is stored.
    rows = gw.sql("SELECT key_sha256, key_id, user_name, name FROM api_keys")
    assert rows == [(hashlib.sha256(key.encode()).hexdigest(), key_id(key), "alice",
                     "laptop")]
    assert gw.sql("SELECT group_name FROM users WHERE name = 'alice'") == [("team",)]
    listing = admin(db, "key", "list").stdout
    assert key not in listing and f"{key_id(key)}\talice\tlaptop" in listing

    status, _, body = gw.request("POST", "/v1/chat/completions", chat(), key=key)
    assert status == 200, body
    status, _, body = gw.request("POST", "/v1/chat/completions", chat(), key=key + "0")
    assert status == 401 and assert_openai_error(body)["code"] == "invalid_api_key"
    assert gw.chat()[0] == 200  # GATEWAY_API_KEYS still work

    admin(db, "key", "revoke", key_id(key))
    start = time.monotonic()
    statuses: List[int] = []
    while True:
        status, _, body = gw.request("POST", "/v1/chat/completions", chat(), key=key)
        statuses.append(status)
        if status != 200:
            break
        assert time.monotonic() - start < 1.5, statuses
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    assert status == 401 and assert_openai_error(body)["code"] == "invalid_api_key"
    assert elapsed < 1.5, elapsed
    #  Revoking again, or an unknown id, fails with status 1.
    assert "already revoked" in admin(db, "key", "revoke", key_id(key), check=1).stderr
    admin(db, "key", "revoke", "00000000", check=1)
    assert gw.chat()[0] == 200


def test_admin_key_allow_list(gw: Any) -> None:
    key = add_key(gw.database_url, "--user", "bob", "--models", "mock-gpt-mini")
    status, _, body = gw.request("POST", "/v1/chat/completions", chat(model=MODEL), key=key)
    assert status == 403 and assert_openai_error(body)["code"] == "model_not_allowed"
    status, _, body = gw.request("POST", "/v1/chat/completions",
                                 chat(model="mock-gpt-mini"), key=key)
    assert status == 200, body


def test_admin_credit_and_price(gw: Any) -> None:
    db = gw.database_url
    admin(db, "user", "credit", "carol", "5", check=1)  # unknown user
    add_key(db, "--user", "carol")
    before = gw.sql("SELECT balance_micros FROM users WHERE name = 'carol'")[0][0]
    out = admin(db, "user", "credit", "carol", "2500000").stdout
    assert out.strip() == f"carol balance {before + 2500000}"
    assert gw.sql("SELECT balance_micros FROM users WHERE name = 'carol'") == [
        (before + 2500000,)]
    admin(db, "price", "set", "mock-gpt", "2500000", "10000000", "1250000")
    assert gw.sql("SELECT input_micros, output_micros, cached_input_micros FROM model_prices"
                  " WHERE model = 'mock-gpt'") == [(2500000, 10000000, 1250000)]
    admin(db, "price", "set", "mock-gpt", "2.5", "1", check=2)
    admin(db, "user", "credit", "carol", "lots", check=2)
    admin(db, "key", "add", check=2)
    admin(db, "frobnicate", check=2)
    assert KEY not in admin(db, "key", "list").stdout
