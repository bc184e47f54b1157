"""Layer 2, seeing attention: what a request asks to capture (`AttentionCapture`, spans), the sinks that
collect the rows during a step, and the statistics and labels of heads (head_stats.py)."""
