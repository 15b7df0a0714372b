"""The official openai npm SDK against the whole gateway (tests/sdk).

Starts the full stack (gateway.Gateway) in front of a mock provider, runs
`npm ci` in tests/sdk when node_modules is missing (the npm registry must be
reachable then), and runs `node --test tests/sdk/sdk.test.mjs` with the
gateway's base URL and key in the environment. The node runner's output is
printed (pytest -s shows it; on failure it is in the assertion message).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from gateway import EMBED_MODEL, MODEL, channel

SDK = REPO / "tests" / "sdk"


def _node() -> str:
    node = shutil.which("node")
    if not node:
        pytest.fail("node is not installed (Node 20+ is needed for tests/sdk)", pytrace=False)
    return node


def _npm_ci() -> None:
    if (SDK / "node_modules" / "openai" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if not npm:
        pytest.fail("npm is not installed and tests/sdk/node_modules is missing", pytrace=False)
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=SDK,
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"npm ci failed in {SDK}:\n{proc.stdout}{proc.stderr}"


def test_openai_sdk_drives_the_gateway(make_mock, make_gateway) -> None:
    node = _node()
    _npm_ci()
    mock = make_mock("a")
    gw = make_gateway([channel("a", mock)])
    env = dict(os.environ, AIGW_BASE_URL=gw.url(), AIGW_API_KEY=gw.key, AIGW_MODEL=MODEL,
               AIGW_EMBED_MODEL=EMBED_MODEL, NO_COLOR="1")
    proc = subprocess.run([node, "--test", "--test-reporter=tap", "sdk.test.mjs"], cwd=SDK,
                          env=env, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"node --test failed:\n{output}\n{gw.logs()}"
    # A runner that ran nothing is not a pass.
    passed = re.search(r"^# pass (\d+)$", output, re.M)
    failed = re.search(r"^# fail (\d+)$", output, re.M)
    assert passed and int(passed.group(1)) >= 9, output
    assert failed and int(failed.group(1)) == 0, output
    # The requests really went through the gateway to the provider.
    by_path = mock.stats()["by_path"]
    # plain + 2 streams; the bad body and the unknown model never reach it.
    assert by_path.get("/v1/chat/completions", 0) == 3, by_path
    assert by_path.get("/v1/completions", 0) == 1, by_path
    assert by_path.get("/v1/embeddings", 0) == 1, by_path
