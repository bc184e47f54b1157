"""Layer 8, the library: `LLMEngine` (the step loop: schedule, run, sample, stop), `Session` (step-by-step
decoding), `LLM` (load a checkpoint, generate, stream) and the request validation they share."""
