"""Layer 7, running steps: the runner (runner.py) turns scheduled sequences into one flat batch and has an
executor run it (step.py: `StepInputs`, `run_step`, `LocalExecutor`), here or on every tensor-parallel rank.

Tensor parallelism on torch.distributed (gloo on CPU, NCCL on CUDA), in the manner of nano-vllm and vLLM.

Rank 0 runs the whole engine (scheduler, block manager, sampler, tokenizer, server); ranks 1..N-1 only run
the model, one step at a time, as rank 0 sends it. Every rank holds a slice of each weight and the KV pool
of its own heads:

    shard.py    which slice of each checkpoint tensor a rank keeps; its model config (H/N query heads,
                KVH/N KV heads, I/N MLP rows, V/N vocabulary rows); the divisibility rule; RankSpec and
                load_rank (a rank's model and KV pool)
    tp_step.py  a step across ranks: the runner's StepInputs sent as a skeleton plus tensors; captured
                attention heads joined on rank 0
    workers.py  WorkerGroup (rank 0's handle: start, load, liveness, shutdown), TensorParallelExecutor
                (rank 0's step over the group) and run_worker (the loop of ranks > 0)
    ../core/comm.py  Rendezvous (self-started or torchrun's), TensorParallel: one rank's collectives
                (all-reduce of row-parallel outputs, vocabulary-parallel embedding and head)

shard.py, tp_step.py and workers.py are imported only when tensor parallelism is asked for.
"""
