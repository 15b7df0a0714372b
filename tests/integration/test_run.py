"""`make run`'s launcher (deploy/run.sh): starts the whole gateway with one
command, prefixes logs, restarts a stage that crashes, stops on Ctrl-C."""

import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

from conftest import BUILD, free_port, wait_for
import gateway

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> List[int]:
    """Every descendant of pid (from /proc)."""
    found: List[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            child = int(entry.name)
            found += [child] + _children(child)
    return found


def _comm(pid: int) -> str:
    """The program name of pid, or "" if it has already gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def test_run_starts_serves_restarts_and_stops(make_mock, tmp_path: Path) -> None:
    mock = make_mock("upstream")
    port = free_port()
    env = dict(os.environ, AIGW_BUILD=str(BUILD), PORT=str(port),
               AIGW_BUS=f"tcp://127.0.0.1:{free_port()}",
               AIGW_TAP=f"tcp://127.0.0.1:{free_port()}",
               TARGET_API_URL=mock.base_url, TARGET_API_KEY="sk-upstream",
               LOG_LEVEL="info",
               # State stays in the test's folder, not the repository's var/.
               DATABASE_URL=str(tmp_path / "aigw.db"),
               AIGW_SPOOL_DIR=str(tmp_path / "spool"))
    env.pop("GATEWAY_API_KEYS", None)
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen(["bash", str(REPO / "deploy" / "run.sh")], cwd=REPO, env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _get(port, "/health/ready") == 200, 20, "the gateway to be ready")
        # Open mode (no keys): a chat goes through to the upstream.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(gateway.chat()),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body: Dict[str, Any] = json.loads(resp.read())
        assert resp.status == 200, body
        assert body["choices"][0]["message"]["content"]
        # Logs are prefixed with the process name.
        text = (tmp_path / "run.log").read_text()
        for name in ("broker", "edge", "auth", "router", "bridge"):
            assert f"[{name}] " in text, f"no [{name}] lines in:\n{text[-2000:]}"
        # A crashed stage is restarted and the gateway serves again.
        bridge = [p for p in _children(run.pid) if _comm(p) == "aigw-bridge"]
        assert len(bridge) == 1, bridge
        os.kill(bridge[0], signal.SIGKILL)
        wait_for(lambda: "bridge exited" in (tmp_path / "run.log").read_text(), 5,
                 "the launcher to notice the crash")
        wait_for(lambda: any(_comm(p) == "aigw-bridge" and p != bridge[0]
                             for p in _children(run.pid)), 10,
                 "the bridge to be restarted")
        wait_for(lambda: _get(port, "/health/ready") == 200, 10, "ready again")
        # Ctrl-C stops everything.
        kids = _children(run.pid)
        assert len(kids) >= 5
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=15)
        time.sleep(0.2)
        alive = [f"{k} {_comm(k)}" for k in kids if _running(k)]
        assert alive == [], f"processes left after Ctrl-C: {alive}"
    finally:
        if run.poll() is None:
            # SIGTERM first: run.sh stops every supervisor, and each runs in
            # its own process group, out of reach of a kill of run.sh's.
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        log.close()
