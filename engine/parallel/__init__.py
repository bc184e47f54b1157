"""Tensor parallelism on torch.distributed (gloo on CPU, NCCL on CUDA), in the manner of nano-vllm and vLLM.

Rank 0 runs the whole engine (scheduler, block manager, sampler, tokenizer, server); ranks 1..N-1 only run
the model, one step at a time, as rank 0 sends it. Every rank holds a slice of each weight and the KV pool
of its own heads:

    shard.py    which slice of each checkpoint tensor a rank keeps; its model config (H/N query heads,
                KVH/N KV heads, I/N MLP rows, V/N vocabulary rows); the divisibility rule; RankSpec and
                load_rank (a rank's model and KV pool)
    comm.py     Rendezvous (self-started or torchrun's), TensorParallel: one rank's collectives
                (all-reduce of row-parallel outputs, vocabulary-parallel embedding and head)
    step.py     a step across ranks: the runner's StepInputs sent as a skeleton plus tensors; captured
                attention heads joined on rank 0
    workers.py  WorkerGroup (rank 0's handle: start, load, liveness, shutdown) and run_worker (the loop
                of ranks > 0)

Nothing here is imported unless tensor parallelism is asked for.
"""
