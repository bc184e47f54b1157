"""Layer 3, the paged KV cache: the tensor pools (pools.py), block bookkeeping in plain Python (blocks.py:
allocator, block tables, the manager with prefix reuse and eviction), 8-bit pools (kv_quant.py), the sink +
window eviction policy (kv_policy.py) and head-aware eviction's plan and pools (head_plan.py, head_pools.py)."""
