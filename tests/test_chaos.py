"""The short chaos soak (`make soak`, not `make test`, whose 15 minutes it would overrun):
`splitserve chaos` for 36 s (2 gateways, 2 schedulers, 2 prefill and 2 decode servers, Redis with
AOF), one fault every ~6 s. Seed 2 draws, in order: SIGKILL of a gateway with streams open, a Redis
restart, SIGKILL of the leading scheduler, a SIGSTOP of a worker past the heartbeat timeout, a
client that disconnects mid-stream. Nothing may be lost or corrupted, no KV block may stay held, and
only clients whose own gateway died may fail. The 10-minute run's figures are in
docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(400), pytest.mark.soak]


def test_faults_under_load_lose_corrupt_and_leak_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", "chaos", "--duration", "36", "--rate", "1.5", "--fault-interval",
         "6", "--seed", "2", "--max-tokens", "24", "--log-dir", str(tmp_path / "logs"), "--out", str(out)],
        capture_output=True, text=True, timeout=380)
    print(result.stdout[-4000:])
    assert out.exists(), result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["lost"] == 0 and report["corrupted"] == {} and report["leaked"] == 0, report
    assert report["failed"] == {}, report  # only where the client's own gateway died (counted apart)
    assert report["sent"] >= 30
    assert report["completed"] + report["failed_own_gateway_died"] + report["disconnected_by_client"] == report["sent"]
    done = {event["fault"] for event in report["faults"] if "not done" not in event["detail"]}
    assert {"kill_gateway", "restart_redis", "kill_leader", "stop_worker"} <= done, report["faults"]
    assert report["up_exit_code"] == 0 and result.returncode == 0
