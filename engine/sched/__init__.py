"""Layer 6, scheduling: a request's `Sequence` (and one step's `ScheduledSeq`), and the scheduler that picks
each step's work within the token and block budgets (continuous batching, chunked prefill, preemption)."""
