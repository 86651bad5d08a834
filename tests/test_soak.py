"""The soak harness in its 60-second mode: real processes, a fault proxy, rotating tokens.

``python -m benchmarks.soak --minutes 1`` runs the reference provider behind a
proxy that cuts and stalls connections, two unicast workers, an SDK broadcast
listener and ``listen --retry --replay``, with 20-second tokens rewritten every
10 seconds.  Its exit status says whether the targets were met.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
async def test_one_minute_of_faults_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    proc = await trio.run_process(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "1", "--json", str(out)],
        cwd=str(ROOT),
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    text = proc.stdout.decode()
    assert proc.returncode == 0, text + proc.stderr.decode()[-3000:]
    report = json.loads(out.read_text())
    assert report["events_published"] > 0
    assert report["connections_cut"] > 0 and report["token_rotations"] >= 4
    assert report["token_refreshes_sdk"] > 0  # the clients did pick up new tokens
    consumers = report["consumers"]
    for name in ("broadcast-sdk", "cli-file"):
        assert consumers[name]["lost"] == consumers[name]["duplicated"] == 0, text
        assert consumers[name]["received"] == report["events_published"], text
    workers = consumers["workers"]
    assert workers["duplicated"] == 0, text
    assert workers["lost"] == workers["lost_explained"], text
    assert "targets met" in text
