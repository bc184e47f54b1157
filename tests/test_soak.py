"""A short run of bench/soak.py: 16 streaming clients for 20 s against `kvmini serve` in a subprocess, with a
KV cache small enough to preempt, 30 % of the streams closed early, and canaries that must answer as they did
alone. `make soak` is the full run."""

from __future__ import annotations

import json

import pytest

from bench.soak import print_report, run_soak

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_soak_short(smollm2_dir, capsys):
    report = run_soak(smollm2_dir, clients=16, duration_s=20, drain_s=60)
    with capsys.disabled():  # the figures are the point of a soak: show them even when it passes
        print()
        print_report(report)
    c = report["counters"]
    failed = json.dumps(report["failed_requests"], indent=1, ensure_ascii=False)
    assert c["http_5xx"] == 0, failed
    assert c["missing_final"] == 0, failed
    assert c["error_events"] == 0 and c["bad_events"] == 0 and c["no_finish_reason"] == 0, failed
    assert c["transport_errors"] == 0, failed
    assert report["kv_blocks_used_end"] == 0
    # Batch invariance: the canaries, sent again and again under load, answer as they did alone.
    assert report["canaries_sent"] > 0
    assert report["canaries_mismatched"] == 0, json.dumps(report["canary_mismatches"], indent=1)
    assert c["completed"] > 0 and c["disconnected"] > 0, c
    assert not report["server_died_during_run"], report["server_log_tail"]
    # RSS after a 20 s run is still warming up: reported above, not checked (`make soak` checks it).
