"""Attention inspection: dumps of a decoding run, per-head statistics and labels, the induction probe, reports.

    dump.py      the file format (AttentionDump, save_dump, load_dump)
    recorder.py  Steps or a Session's attention log -> AttentionDump (record_prompt, dump_session)
    stats.py     HeadStats (online), Thresholds, label_heads, top_heads
    probe.py     Probe / run_probe: BOS + k random tokens twice
    report.py    the self-contained HTML report
    png.py       PNG heatmaps (needs the optional matplotlib)
    cli.py       `kvmini attn`

Nothing here imports transformers or matplotlib at import time. See docs/ATTENTION.md.
"""

from engine.capture.head_labels import HeadLabel, Thresholds, label_heads, top_heads
from engine.capture.head_stats import HeadStats
from engine.inspect.dump import AttentionDump, TopKRows, load_dump, save_dump
from engine.inspect.probe import Probe, run_probe
from engine.inspect.recorder import Recorder, dump_session, record_prompt

__all__ = [
    "AttentionDump",
    "HeadLabel",
    "HeadStats",
    "Probe",
    "Recorder",
    "Thresholds",
    "TopKRows",
    "dump_session",
    "label_heads",
    "load_dump",
    "record_prompt",
    "run_probe",
    "save_dump",
    "top_heads",
]
