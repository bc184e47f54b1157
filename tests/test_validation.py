"""Validation in one place (engine/api/validation.py) and failure isolation in `LLMEngine.step`:
hostile values are refused when a request is made, naming the field, and a request that still fails
in a step ends alone while the rest of its batch goes on unchanged."""

from __future__ import annotations

import math

import pytest

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.api.validation import ContextLimits, resolve_max_tokens
from engine.core.checks import check_float, check_messages, check_text
from engine.core.errors import CacheFullError, RequestError, RequestTooLargeError


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    out = tmp_path_factory.mktemp("validation") / "tiny"
    make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64)
    return LLM(out, dtype="float32", num_blocks=40)  # 640 tokens of KV, context 512


def param_of(fn) -> str | None:
    with pytest.raises(RequestError) as e:
        fn()
    return e.value.param


# ---- rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", 1e300), ("temperature", math.inf), ("temperature", math.nan), ("temperature", -0.1),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 0.0), ("top_p", 0.0), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("top_k", 2**70), ("top_k", 2**63), ("top_k", -2), ("seed", 2**64),
    ("seed", -(2**63) - 1), ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21), ("temperature", "0.5"),
    ("top_k", True), ("ignore_eos", 1),
])
def test_sampling_params_refuse_values_with_the_field(field, value):
    assert param_of(lambda: SamplingParams(**{field: value})) == field


def test_float_rules_name_float32():
    with pytest.raises(RequestError, match="not representable in float32"):
        check_float("repetition_penalty", 1e-300, 0.0, lo_open=True)
    assert check_float("temperature", 1e30, 0.0) == 1e30  # large but a float32
    assert check_float("x", 2**100, 0.0) == 2.0**100


def test_text_and_stop_strings_must_be_valid_unicode():
    with pytest.raises(RequestError, match="lone surrogate U\\+D800 at index 3"):
        check_text("prompt", "abc\ud800def")
    assert param_of(lambda: SamplingParams(stop=["ok", "x\udfff"])) == "stop[1]"
    assert param_of(lambda: SamplingParams(stop=[""])) == "stop[0]"
    assert param_of(lambda: SamplingParams(stop_token_ids=[1, -1])) == "stop_token_ids[1]"


def test_chat_messages_are_checked_per_field():
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
          {"role": "assistant", "content": None}]
    assert check_messages(ok) == ok
    assert param_of(lambda: check_messages([])) == "messages"
    assert param_of(lambda: check_messages([{"role": "robot", "content": "x"}])) == "messages[0].role"
    assert param_of(lambda: check_messages([{"role": "user"}])) == "messages[0].content"
    assert param_of(lambda: check_messages([{"role": "user", "content": None}])) == "messages[0].content"
    assert param_of(lambda: check_messages([{"role": "user", "content": 5}])) == "messages[0].content"
    assert param_of(lambda: check_messages([{"role": "user", "content": []}])) == "messages[0].content"
    bad_part = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]
    assert param_of(lambda: check_messages(bad_part)) == "messages[0].content[0]"
    assert param_of(lambda: check_messages([{"role": "user", "content": "a\ud800"}])) == "messages[0].content"
    assert param_of(lambda: check_messages([{"role": "user", "content": "a", "name": "\udc00"}])) == "messages[0].name"


def test_context_rules_written_once():
    limits = ContextLimits(vocab_size=100, max_model_len=64, num_blocks=3, block_size=16)  # pool: 48 tokens
    assert resolve_max_tokens(10, None, limits) == 38  # "as many as fit": the pool, not the context
    assert resolve_max_tokens(10, 39, limits) == 39  # 10 + 39 - 1 = 48 tokens of KV: exactly the pool
    with pytest.raises(RequestTooLargeError) as e:
        resolve_max_tokens(10, 40, limits)
    assert e.value.param == "max_tokens" and e.value.code == "request_too_large"
    assert isinstance(e.value, CacheFullError)  # what the library raised before
    with pytest.raises(RequestError) as e:
        resolve_max_tokens(10, 55, limits, max_tokens_param="max_completion_tokens")
    assert e.value.param == "max_completion_tokens" and e.value.code == "context_length_exceeded"
    for n, param in ((0, "prompt"), (65, "prompt"), (48, "prompt")):
        assert param_of(lambda: resolve_max_tokens(n, None, limits)) == param
    assert param_of(lambda: resolve_max_tokens(10, 0, limits)) == "max_tokens"


# ---- the library refuses at admission ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    (dict(stop_token_ids=[99999999]), "stop_token_ids[0]"),
    (dict(stop_token_ids=[259]), "stop_token_ids[0]"),  # == vocab size: one past the end
    (dict(stop_token_ids=[2**70]), "stop_token_ids[0]"),
    (dict(max_tokens=600), "max_tokens"),
])
def test_engine_refuses_what_would_fail_a_step(llm, kwargs, param):
    assert llm.config.vocab_size == 259
    params = SamplingParams(**({"max_tokens": 4, "min_tokens": 2} | kwargs))
    assert param_of(lambda: llm.engine.add_request([1, 2, 3], params)) == param
    assert not llm.engine.has_unfinished() and llm.blocks.allocator.num_used == 0


def test_library_entry_points_share_the_prompt_rules(llm):
    assert param_of(lambda: llm.generate("abc\ud800")) == "prompt"
    assert param_of(lambda: llm.generate([[1, 2, 259]])) == "prompt[2]"
    assert param_of(lambda: llm.generate([[]])) == "prompt"
    assert param_of(lambda: llm.logits([1, -1])) == "token_ids[1]"
    assert param_of(lambda: llm.logits([1] * 513)) == "token_ids"
    assert param_of(lambda: llm.session([5, 2**64])) == "prompt[1]"
    with llm.session([1, 2, 3]) as s:
        assert param_of(lambda: s.feed([4, 300])) == "token_ids[1]"
        assert param_of(lambda: s.feed([4] * 510)) == "token_ids"  # 3 + 510 > 512
    assert param_of(lambda: llm.chat([{"role": "user", "content": "x\ud800"}])) == "messages[0].content"


def test_chat_template_failures_are_request_errors(llm, monkeypatch):
    for template in ("{% include 'x.jinja' %}", "{% for i in range(10**9) %}{% endfor %}",
                     "{{ raise_exception('no system messages') }}", "{{ messages[5]['content'] }}"):
        monkeypatch.setitem(llm.tokenizer.chat_templates, "default", template)
        with pytest.raises(RequestError, match="cannot apply the chat template") as e:
            llm.chat_prompt([{"role": "user", "content": "hi"}])
        assert e.value.param == "messages"


def test_tiny_penalty_and_huge_temperature_sample_real_tokens(llm):
    # Values at the edge of float32 still give a distribution, never NaN (token 0 every step).
    for params in (SamplingParams(repetition_penalty=1e-37, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
                   SamplingParams(temperature=3e38, min_tokens=4, seed=2, max_tokens=8),
                   SamplingParams(temperature=1e-5 * 1.01, repetition_penalty=1e-30, seed=3, max_tokens=8,
                                  ignore_eos=True, logprobs=2)):
        out = llm.generate([5, 6, 7], params)[0]
        assert len(out.token_ids) == 8 and len(set(out.token_ids)) > 1, out.token_ids
        assert all(math.isfinite(lp.logprob) for lp in out.logprobs or [])


# ---- failure isolation ------------------------------------------------------------------------------------


POISON = 77  # a prompt starting with this token fails inside the step


def test_a_failing_request_ends_alone_and_the_batch_goes_on(llm, monkeypatch):
    prompts = [[10 + i, 20, 30 + i, 40] for i in range(8)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True)]
    alone = [llm.generate(p, params[i % 2])[0].token_ids for i, p in enumerate(prompts)]

    real_run = llm.runner.run
    calls = {"batched": 0}

    def run(work):
        if any(w.seq.token_ids[0] == POISON for w in work):
            if len(work) > 1:
                calls["batched"] += 1
            if any(w.seq.num_tokens > 6 for w in work if w.seq.token_ids[0] == POISON):
                raise RuntimeError("injected failure")
        return real_run(work)

    monkeypatch.setattr(llm.runner, "run", run)
    engine = llm.engine
    rids = [engine.add_request(p, params[i % 2]) for i, p in enumerate(prompts)]
    poisoned = engine.add_request([POISON, 1, 2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert calls["batched"] > 0  # the poisoned request really ran in the others' batch
    assert final[poisoned].finish_reason == "error" and "injected failure" in final[poisoned].error
    assert len(final[poisoned].token_ids) == 4  # it advanced until the step it broke
    assert [final[r].token_ids for r in rids] == alone
    assert all(final[r].finish_reason == "length" for r in rids)
    assert llm.blocks.allocator.num_used == 0


def test_a_failure_in_one_requests_bookkeeping_ends_only_it(llm, monkeypatch):
    from engine.text.tokenizer import IncrementalDetokenizer

    real_add = IncrementalDetokenizer.add

    def add(self, token_id):
        if self.ids[:1] == [] and self.skip_special_tokens is False:
            raise ValueError("detokenizer broke")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    good = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    bad = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, skip_special_tokens=False)
    outs = llm.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [good, bad, good])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "detokenizer broke" in outs[1].error
    assert llm.blocks.allocator.num_used == 0
    with pytest.raises(RuntimeError, match="detokenizer broke"):
        list(llm.stream([4, 5, 6], bad))


def test_a_waiting_request_counts_one_prefix_lookup(llm):
    # Two long requests fill the pool, so the third waits (and the second is preempted) for many steps;
    # each request's prefix lookup still counts once, when it is first admitted.
    llm.blocks.reset_prefix_cache()
    engine = llm.engine
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    for start in (1000, 2000):
        engine.add_request([(start + i) % 250 for i in range(300)], long)
    engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    waited = 0
    while engine.has_unfinished():
        engine.step()
        waited += engine.stats()["waiting"] > 0
    stats = engine.stats()
    assert waited > 5 and stats["preemptions"] > 0
    assert stats["prefix_cache_queries"] == 2 * ((300 - 1) // 16) + (39 - 1) // 16
    assert llm.blocks.allocator.num_used == 0


def test_the_servers_chat_roles_are_the_engines():
    from engine.core.checks import CHAT_ROLES
    from server.protocol import CHAT_ROLES as SERVER_ROLES

    assert SERVER_ROLES == CHAT_ROLES
