"""Tensor-parallel ranks as processes: 3 ranks of SmolLM2's MHA variant give one rank's tokens; the N must divide
the KV heads; a killed rank ends the engine with a clear error, fast; garbage collection, interpreter exit and
torchrun's launcher each leave no rank behind.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import LLM
from engine.core.errors import EngineDeadError
from engine.sampling.params import SamplingParams

pytest.importorskip("transformers")
from test_model import build_tiny  # noqa: E402
from test_tensor_parallel import GREEDY, THREADS, assert_stopped, start, tokens  # noqa: E402

REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def smollm2_mha(smollm2_dir, tmp_path_factory) -> Path:
    from engine.kv_memory.variants import convert_kv_heads

    return convert_kv_heads(smollm2_dir, 9, tmp_path_factory.mktemp("smollm2-mha") / "mha9")


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_mha_three_ranks_match_one_and_stop_when_collected(smollm2_mha) -> None:
    one = LLM(smollm2_mha, dtype="float32", num_blocks=32, threads=THREADS)
    prompts = [one.chat_prompt([{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Write a haiku about the sea.")]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = tokens(one, prompts, params)
    del one
    three = LLM(smollm2_mha, dtype="float32", num_blocks=32, tensor_parallel_size=3, threads=THREADS)
    assert three.model.config.num_key_value_heads == 3  # 9 KV heads, 3 per rank
    assert tokens(three, prompts, params) == expected
    pids = [p.pid for p in three.workers.processes]
    del three
    gc.collect()  # garbage collection stops the ranks (weakref.finalize), as close() and interpreter exit do
    assert_stopped(pids)


# --------------------------------------------------------------------------------------------- failures and exits


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gqa-plain")
    build_tiny(out, num_kv_heads=2, num_heads=4)
    return out


@pytest.fixture(scope="module")
def three_kv_heads(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kv3")
    build_tiny(out, num_kv_heads=3, num_heads=6, hidden=48)
    return out


def test_ranks_must_divide_the_kv_heads(three_kv_heads) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide the model's 3 KV heads.* 1, 3"):
        start(three_kv_heads, 2)


def test_a_killed_rank_ends_the_engine_with_a_clear_error(three_kv_heads) -> None:
    llm = start(three_kv_heads, 3)
    victim, other = llm.workers.processes[1], llm.workers.processes[0]
    killed_at: list[float] = []

    def kill() -> None:
        os.kill(victim.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Timer(0.3, kill).start()
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    deadline = time.monotonic() + 60
    with pytest.raises(EngineDeadError, match=rf"rank 2 \(pid {victim.pid}\) exited with code -9") as error:
        while time.monotonic() < deadline:
            llm.generate([[1, 2, 3]], long)
    assert killed_at and time.monotonic() - killed_at[0] < 10  # seconds, not a hang
    assert llm.failure == str(error.value)
    with pytest.raises(EngineDeadError):  # and it stays dead
        llm.generate([[1, 2, 3]], GREEDY)
    assert_stopped([victim.pid, other.pid])  # the survivor was stopped too, not left waiting in a collective
    # A server over it says so: /health and every new request answer 503 engine_dead.
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(llm)) as http:
        for response in (http.get("/health"), http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "engine_dead" and "rank 2" in response.json()["error"]["message"]
    llm.close()


EXIT_SCRIPT = """
import sys
from engine import LLM
llm = LLM(sys.argv[1], dtype="float32", threads=1, tensor_parallel_size=2)
print(*[p.pid for p in llm.workers.processes], flush=True)
print(llm.generate([[1, 2, 3]])[0].token_ids, flush=True)
"""  # no close(): interpreter exit must stop the ranks


def test_interpreter_exit_stops_the_ranks(pair_dir) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(pair_dir)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_stopped([int(pid) for pid in done.stdout.split("\n")[0].split()])


def test_torchrun_ranks_generate_what_one_rank_does(pair_dir) -> None:
    """The launcher path (RANK, WORLD_SIZE, MASTER_ADDR... in the environment) on one machine, as on several."""
    args = ["generate", "--model", str(pair_dir), "--prompt", "abc", "--max-tokens", "8", "--dtype", "float32",
            "--quantization", "none", "--threads", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launched = subprocess.run(torchrun + ["-m", "engine.cli"] + args, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert launched.returncode == 0, launched.stderr[-2000:]
    [alone] = LLM(pair_dir, dtype="float32", threads=THREADS).generate("abc", SamplingParams(temperature=0.0,
                                                                                             max_tokens=8))
    assert launched.stdout == alone.text + "\n"
