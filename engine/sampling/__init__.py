"""Layer 5, choosing tokens: a request's `SamplingParams` (params.py), the batched sampler (sampler.py), stop
strings (stop.py) and n-gram drafts for speculative decoding (speculative.py)."""
