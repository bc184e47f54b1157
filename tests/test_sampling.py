"""Sampling parameters, the batched sampler and stop conditions."""

from __future__ import annotations

import pytest
import torch

from engine.core.errors import RequestError
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p,
    make_generator,
    process_logits,
)
from engine.sampling.stop import StopChecker

V = 50


def _logits(b: int = 4, v: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


# ------------------------------------------------------------------------------------------------
# SamplingParams validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": False}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": 1.0}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
    ],
)
def test_invalid_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.logprobs) == (16, 0, [], [], None)
    assert not p.is_greedy and SamplingParams(temperature=0).is_greedy
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    t = SamplingParams(temperature=1).temperature
    assert t == 1.0 and isinstance(t, float)
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams(top_k=-1).top_k == -1
    assert "temperature must be >= 0" in _msg(temperature=-1)


def _msg(**kw) -> str:
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    return str(e.value)


# ------------------------------------------------------------------------------------------------
# Greedy and filters that collapse to greedy


def test_greedy_is_argmax_and_degenerate_filters_match_greedy():
    logits = _logits(6)
    want = logits.argmax(-1)
    s = Sampler(seed=0)
    for p in [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(temperature=1.5, top_k=1),
    ]:
        for _ in range(5):
            assert torch.equal(s.sample(logits, [p] * 6).token_ids, want), p


def test_greedy_accepts_half_precision():
    logits = _logits(3).to(torch.bfloat16)
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 3)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    out = Sampler(seed=1).sample(logits, [SamplingParams(top_k=1)] * 3)
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


def _min_p_allowed(row: torch.Tensor) -> set[int]:
    probs = row.softmax(-1)
    return set(torch.nonzero(probs >= 0.3 * probs.max())[:, 0].tolist())


@pytest.mark.parametrize(
    "params, allowed_fn",
    [
        (SamplingParams(top_k=3), lambda row: set(row.topk(3).indices.tolist())),
        (SamplingParams(top_p=0.5), None),
        (SamplingParams(min_p=0.3), _min_p_allowed),
    ],
)
def test_masked_tokens_are_never_sampled(params, allowed_fn):
    row = torch.tensor([4.0, 3.5, 3.2, 3.0, 1.0, 0.5, 0.0, -1.0, -2.0, 2.9])
    if allowed_fn is None:  # top_p=0.5: smallest set of most likely tokens reaching mass 0.5
        probs, order = row.softmax(-1).sort(descending=True)
        n = int((probs.cumsum(-1) < 0.5).sum()) + 1
        allowed = set(order[:n].tolist())
    else:
        allowed = allowed_fn(row)
    assert 1 < len(allowed) < 10
    logits = row.expand(2000, -1).contiguous()
    out = Sampler(seed=3).sample(logits, [params] * 2000).token_ids
    assert set(out.tolist()) == allowed  # every allowed id shows up, nothing else does


# ------------------------------------------------------------------------------------------------
# Against transformers' logits processors


def test_filters_match_transformers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    for seed in range(5):
        logits = _logits(1, 200, seed=seed)
        for temp, k, p, mp in [(0.7, 0, 1.0, 0.0), (1.0, 10, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
                               (0.5, 20, 0.9, 0.05), (1.3, 50, 0.95, 0.0), (0.8, 0, 0.6, 0.2), (1.0, 200, 0.3, 0.0)]:
            params = SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=mp)
            ours = process_logits(logits, [params])
            ref = logits.clone()
            ref = TemperatureLogitsWarper(temp)(None, ref)
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            if p < 1:
                ref = TopPLogitsWarper(p)(None, ref)
            if mp:
                ref = MinPLogitsWarper(mp)(None, ref)
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (seed, temp, k, p, mp)
            keep = ~torch.isinf(ref)
            torch.testing.assert_close(ours[keep], ref[keep])


def test_batched_filters_match_transformers_row_by_row():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = _logits(5, 100, seed=7)
    top_k = torch.tensor([0, 5, 1, 100, 30])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.2, 0.99], dtype=torch.float64)
    ours = apply_top_k_top_p(logits.clone(), top_k, top_p)
    for i in range(5):
        ref = logits[i : i + 1].clone()
        if 0 < top_k[i] < 100:
            ref = TopKLogitsWarper(int(top_k[i]))(None, ref)
        ref = TopPLogitsWarper(float(top_p[i]))(None, ref)
        assert torch.equal(ours[i : i + 1], ref), i
    only_k = apply_top_k_top_p(logits.clone(), top_k, None)
    for i in range(5):
        ref = logits[i : i + 1].clone()
        if 0 < top_k[i] < 100:
            ref = TopKLogitsWarper(int(top_k[i]))(None, ref)
        assert torch.equal(only_k[i : i + 1], ref), i
    temps = torch.tensor([0.5, 1.0, 2.0, 0.9, 1.1])
    torch.testing.assert_close(apply_temperature(logits.clone(), temps), logits / temps[:, None])
    minp = apply_min_p(logits.clone(), torch.tensor([0.0, 0.1, 0.5, 1.0, 0.02]))
    assert not torch.isinf(minp[0]).any() and (~torch.isinf(minp[3])).sum() == 1


def test_top_k_top_p_candidate_path_and_ties_match_transformers():
    """Every top-p row has a top-k (only the top max(k) are sorted), including logits with ties
    at the k-th value (rounded logits, as bf16 produces) that spill past the candidates."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    base = _logits(4, 300, seed=9)
    for tied, logits in ((False, base), (True, base.round()), (True, (base * 2).round() / 4)):
        top_k = torch.tensor([5, 40, 3, 60])
        top_p = torch.tensor([0.9, 0.5, 1.0, 0.99], dtype=torch.float64)
        ours = apply_top_k_top_p(logits.clone(), top_k, top_p)
        for i in range(4):
            ref = TopKLogitsWarper(int(top_k[i]))(None, logits[i : i + 1].clone())
            ref = TopPLogitsWarper(float(top_p[i]))(None, ref)[0]
            if not tied:
                assert torch.equal(ours[i], ref), i
            else:  # which of several equal logits top-p cuts is a tie-break: compare the kept values
                kept, ref_kept = ours[i][~torch.isinf(ours[i])], ref[~torch.isinf(ref)]
                assert torch.equal(kept.sort().values, ref_kept.sort().values), i

    # Ten logits tie at the k-th value: top_k keeps all of them, more than the top max(k).
    row = torch.tensor([[5.0] + [1.0] * 10 + [0.0, -1.0]])
    ours = apply_top_k_top_p(row.clone(), torch.tensor([3]), torch.tensor([0.99], dtype=torch.float64))
    ref = TopPLogitsWarper(0.99)(None, TopKLogitsWarper(3)(None, row.clone()))
    assert torch.equal(ours, ref) and (~torch.isinf(ours)).sum() == 11


def test_top_p_large_vocab_candidate_and_fallback_paths_match_transformers(monkeypatch):
    """Top-p without top-k on a vocabulary larger than TOP_P_CANDIDATES: a peaked (LLM-like)
    distribution takes the candidate path, a flat one falls back to the full sort."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from engine.sampling.sampler import TOP_P_CANDIDATES

    v = 4 * TOP_P_CANDIDATES
    g = torch.Generator().manual_seed(4)
    ranks = torch.arange(1, v + 1, dtype=torch.float32)
    rows = [(-2.0 * ranks.log() + 0.3 * torch.randn(v, generator=g))[torch.randperm(v, generator=g)] for _ in range(3)]
    peaked = torch.stack(rows)
    flat = torch.randn(3, v, generator=g) * 0.5
    top_p = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sorts.append(1) or real_sort(self, *a, **kw))
    for logits, full_sort in ((peaked, False), (flat, True)):
        sorts.clear()
        ours = apply_top_k_top_p(logits.clone(), None, top_p)
        mixed = apply_top_k_top_p(logits.clone(), torch.tensor([0, 3, 0]), top_p)  # one row with top-k too
        assert bool(sorts) == full_sort
        for i in range(3):
            ref = TopPLogitsWarper(float(top_p[i]))(None, logits[i : i + 1].clone())[0]
            assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), i
            assert torch.equal(ours[i], ref)
            if i != 1:
                assert torch.equal(mixed[i], ref), i
        kept = (~torch.isinf(ours)).sum(-1)
        assert bool((kept < v).all()) and int(kept[2]) > 1


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(2, 64, seed=11)
    prompts = [[1, 5, 9, 5], [0, 63]]
    outputs = [[9, 20, 20], [33]]
    for penalty in (1.3, 0.7):
        params = [SamplingParams(repetition_penalty=penalty)] * 2
        ours = process_logits(logits, params, prompts, outputs, filters=False)
        for i in range(2):
            ids = torch.tensor([prompts[i] + outputs[i]])
            ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())
            assert torch.equal(ours[i : i + 1], ref)


def test_presence_and_frequency_penalties_by_hand():
    logits = _logits(3, 16, seed=2)
    prompts = [[1, 2, 3], [4], [5]]
    outputs = [[3, 3, 7], [], torch.tensor([0, 0, 0, 15])]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=1.0),
        SamplingParams(frequency_penalty=-1.0, repetition_penalty=2.0),
    ]
    ours = process_logits(logits, params, prompts, outputs, filters=False)
    want = logits.clone()
    for i, (p, out) in enumerate(zip(params, outputs)):
        out = [int(t) for t in out]
        for t in range(16):
            x = want[i, t].item()
            if p.repetition_penalty != 1.0 and (t in out or t in prompts[i]):
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            c = out.count(t)
            x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            want[i, t] = x
    torch.testing.assert_close(ours, want)
    # Presence/frequency ignore prompt tokens.
    assert ours[0, 1] == logits[0, 1] and ours[1, 4] == logits[1, 4]
    # apply_penalties directly, the low-level form
    direct = apply_penalties(logits.clone(), [[]], [[3, 3]], None, torch.tensor([0.5, 0, 0])[:1], None)
    assert direct[0, 3] == logits[0, 3] - 0.5


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]])
    p = SamplingParams(temperature=0, frequency_penalty=1.0)
    out = Sampler().sample(logits, [p], output_token_ids=[[0]], prompt_token_ids=[[]])
    assert out.token_ids.tolist() == [1]
    out = Sampler().sample(logits, [SamplingParams(temperature=0)], banned_token_ids=[[0, 1]])
    assert out.token_ids.tolist() == [2]


# ------------------------------------------------------------------------------------------------
# Distribution and seeds


def test_empirical_distribution_matches_softmax():
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.8, -1.0, 0.2, 0.3])
    n = 20000
    out = Sampler(seed=123).sample(row.expand(n, -1).contiguous(), [SamplingParams(temperature=0.7)] * n).token_ids
    freq = torch.bincount(out, minlength=8).float() / n
    want = torch.softmax(row / 0.7, -1)
    # ~4.5 standard deviations of a binomial proportion at n = 20000
    assert torch.all((freq - want).abs() < 4.5 * torch.sqrt(want * (1 - want) / n)), (freq, want)


def _run(sampler: Sampler, logits_seq: list[torch.Tensor], params: list[SamplingParams], gens) -> list[list[int]]:
    toks = [[] for _ in params]
    for logits in logits_seq:
        out = sampler.sample(logits, params, gens).token_ids.tolist()
        for i, t in enumerate(out):
            toks[i].append(t)
    return toks


def test_same_seed_same_tokens_alone_or_batched():
    steps = [_logits(4, 300, seed=100 + s, scale=1.0) for s in range(12)]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    alone = _run(Sampler(), [x[1:2] for x in steps], [seeded], [make_generator(42)])[0]
    again = _run(Sampler(), [x[1:2] for x in steps], [seeded], [make_generator(42)])[0]
    assert alone == again
    assert len(set(alone)) > 3  # it really sampled
    other = SamplingParams(temperature=1.0, top_k=20, seed=7)
    params = [SamplingParams(temperature=1.2), seeded, other, SamplingParams(temperature=0)]
    gens = [None, make_generator(42), make_generator(7), None]
    batched = _run(Sampler(), steps, params, gens)
    assert batched[1] == alone
    params = [SamplingParams(min_p=0.1), seeded]
    batched2 = _run(Sampler(seed=5), [x[:2] for x in steps], params, [None, make_generator(42)])
    assert batched2[1] == alone
    different = _run(Sampler(), [x[1:2] for x in steps], [seeded], [make_generator(43)])[0]
    assert different != alone


def test_seeded_row_requires_a_generator():
    with pytest.raises(ValueError, match="generator"):
        Sampler().sample(_logits(1), [SamplingParams(seed=1)])


# ------------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_are_penalised_log_softmax_and_sorted():
    logits = _logits(4, 40, seed=5)
    params = [
        SamplingParams(temperature=0.5, logprobs=5),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
        SamplingParams(temperature=1.0, logprobs=20, presence_penalty=1.0),
    ]
    out = Sampler(seed=0).sample(logits, params, [None] * 4, [[]] * 4, [[], [], [], [3, 4]])
    penalised = logits.clone()
    penalised[3, [3, 4]] -= 1.0
    lsm = torch.log_softmax(penalised, -1)
    for i in (0, 1, 3):
        t = int(out.token_ids[i])
        assert out.logprobs[i] == pytest.approx(lsm[i, t].item(), abs=1e-5)
        n = params[i].logprobs
        assert len(out.top_token_ids[i]) == len(out.top_logprobs[i]) == n
        assert out.top_logprobs[i] == sorted(out.top_logprobs[i], reverse=True)
        assert out.top_token_ids[i] == lsm[i].topk(n).indices.tolist() if n else True
    assert out.logprobs[2] is None and out.top_token_ids[2] is None and out.top_logprobs[2] is None
    assert out.top_token_ids[1] == []


# ------------------------------------------------------------------------------------------------
# StopChecker


def _feed(checker: StopChecker, deltas: list[str], token_ids: list[int] | None = None):
    emitted, reason = [], None
    for j, d in enumerate(deltas):
        text, reason = checker.push(token_ids[j] if token_ids else 100 + j, d)
        emitted.append(text)
        if reason:
            break
    return emitted, reason


def test_stop_string_across_deltas_is_trimmed_and_never_leaks():
    stop = "lo W"
    c = StopChecker(SamplingParams(stop=stop, max_tokens=100), eos_token_ids=[2])
    emitted, reason = _feed(c, ["Hel", "lo W", "orld"])
    assert reason == "stop" and c.stop_reason == stop and c.finish_reason == "stop"
    assert "".join(emitted) == "Hel" == c.text
    assert emitted == ["He", "l"]  # "l" held back at first: it could begin "lo W"

    # Char by char: at every step the streamed text is a prefix of the final text, i.e. no
    # character of the stop string that finally matched was ever shown.
    full = "Hello World"
    c = StopChecker(SamplingParams(stop=stop, max_tokens=100))
    emitted, reason = _feed(c, list(full))
    assert reason == "stop" and "".join(emitted) == "Hel"
    shown = ""
    for e in emitted:
        shown += e
        assert "Hel".startswith(shown)
    assert emitted == ["H", "e", "", "l", "", "", ""]  # 2nd "l", "o", " ", "W": held, then dropped
    # Same over uneven deltas.
    c = StopChecker(SamplingParams(stop=stop, max_tokens=100))
    emitted, reason = _feed(c, ["H", "el", "l", "o ", "Wo", "rld"])
    assert reason == "stop" and c.text == "Hel" and emitted == ["H", "e", "l", "", ""]


def test_stop_string_inside_one_delta_and_earliest_match_wins():
    c = StopChecker(SamplingParams(stop=["world", "o w", "xyz"]))
    emitted, reason = _feed(c, ["hell", "o world and more"])
    assert reason == "stop" and c.stop_reason == "o w" and "".join(emitted) == "hell"
    c = StopChecker(SamplingParams(stop=["cd", "abcd"]))
    emitted, reason = _feed(c, ["xx", "abcdef"])
    assert c.stop_reason == "abcd" and "".join(emitted) == "xx"


def test_held_back_suffix_is_the_longest_prefix_of_any_stop_string():
    # The search tries only suffixes that start with a stop string's first character; it must agree with
    # trying every length.
    import random

    def every_length(stops: list[str], text: str) -> int:
        for k in range(min(max(map(len, stops)) - 1, len(text)), 0, -1):
            if any(len(s) > k and s.startswith(text[-k:]) for s in stops):
                return k
        return 0

    rng = random.Random(0)
    for _ in range(5000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 10)))
        assert StopChecker(SamplingParams(stop=stops))._partial_suffix_len(text) == every_length(stops, text)


def test_flush_releases_held_text_when_no_stop_matches():
    c = StopChecker(SamplingParams(stop="STOP", max_tokens=100))
    emitted, reason = _feed(c, ["a S", "T"])
    assert reason is None and "".join(emitted) == "a "
    assert c.flush() == "ST" and c.text == "a ST"
    assert c.flush() == ""
    # A false start is released as soon as it is ruled out.
    c = StopChecker(SamplingParams(stop="STOP", max_tokens=100))
    assert _feed(c, ["a S", "Tx"])[0] == ["a ", "STx"]
    # Finishing on length releases held text by itself.
    c = StopChecker(SamplingParams(stop="STOP", max_tokens=2))
    emitted, reason = _feed(c, ["a S", "T"])
    assert reason == "length" and "".join(emitted) == "a ST"


def test_eos_and_ignore_eos():
    c = StopChecker(SamplingParams(max_tokens=10), eos_token_ids=[2, 3])
    assert c.push(5, "hi") == ("hi", None)
    assert c.is_stop_token(3) and not c.is_stop_token(5)
    assert c.push(3, "") == ("", "stop")  # a stop token's own text is never passed in
    assert c.stop_reason is None and c.finished
    with pytest.raises(RuntimeError):
        c.push(5, "x")
    c = StopChecker(SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=[2])
    assert c.push(2, "") == ("", None)
    assert c.push(2, "") == ("", None)
    assert c.push(2, "") == ("", "length")
    assert c.banned_token_ids(0) == ()


def test_eos_releases_held_text():
    c = StopChecker(SamplingParams(stop="abc"), eos_token_ids=[2])
    assert c.push(7, "xa") == ("x", None)
    assert c.push(2, "") == ("a", "stop")
    # Text released just before the stop token (a byte run it closed) is emitted with the held text.
    c = StopChecker(SamplingParams(stop="abc", stop_token_ids=[9]), eos_token_ids=[2])
    assert c.push(7, "xa") == ("x", None)
    assert c.is_stop_token(9)
    assert c.push(9, "é") == ("aé", "stop") and c.stop_reason == 9 and c.text == "xaé"


def test_is_stop_token_respects_min_tokens_and_ignore_eos():
    c = StopChecker(SamplingParams(min_tokens=2, max_tokens=10, stop_token_ids=[9]), eos_token_ids=[2])
    assert not c.is_stop_token(2) and not c.is_stop_token(9)  # the first token may not stop
    c.push(5, "a")
    assert c.is_stop_token(2) and c.is_stop_token(9)
    c = StopChecker(SamplingParams(ignore_eos=True, stop_token_ids=[9]), eos_token_ids=[2])
    assert not c.is_stop_token(2) and c.is_stop_token(9)


def test_min_tokens_suppresses_eos_and_stop():
    p = SamplingParams(min_tokens=3, max_tokens=10, stop_token_ids=[9], stop="!")
    c = StopChecker(p, eos_token_ids=[2])
    assert set(c.banned_token_ids()) == {2, 9}
    assert c.push(2, "a") == ("a", None)
    assert c.banned_token_ids() == (2, 9)
    assert c.push(9, "!") == ("!", None)
    assert c.banned_token_ids() == (2, 9)
    assert c.push(5, "b") == ("b", None)
    assert c.banned_token_ids() == ()
    assert c.push(2, "") == ("", "stop")
    # With ignore_eos only the stop ids are banned.
    c = StopChecker(SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=[9]), eos_token_ids=[2])
    assert c.banned_token_ids() == (9,)
    # Stop strings become live once min_tokens is reached (the token completing it counts).
    c = StopChecker(SamplingParams(min_tokens=2, stop="xy"))
    assert c.push(1, "xy") == ("xy", None)
    assert c.push(1, "axy") == ("a", "stop")


def test_max_tokens_and_context_limit_give_length():
    c = StopChecker(SamplingParams(max_tokens=3))
    assert [c.push(1, "a")[1] for _ in range(3)] == [None, None, "length"]
    assert c.text == "aaa"
    c = StopChecker(SamplingParams(max_tokens=None), max_len=10, prompt_len=8)
    assert c.max_new_tokens == 2
    assert [c.push(1, "a")[1] for _ in range(2)] == [None, "length"]
    c = StopChecker(SamplingParams(max_tokens=100), [], 5)
    assert c.max_new_tokens == 5
    c = StopChecker(SamplingParams(max_tokens=4))
    assert c.push(1, "a", num_generated=4) == ("a", "length")


def test_stop_token_ids():
    c = StopChecker(SamplingParams(stop_token_ids=[7, 8]), eos_token_ids=[2])
    assert c.push(1, "x") == ("x", None)
    assert c.push(8, "") == ("", "stop")  # callers pass no text for a stop token (is_stop_token)
    assert c.stop_reason == 8 and c.text == "x"


def test_sampler_respects_stopchecker_bans():
    p = SamplingParams(min_tokens=2, temperature=0)
    c = StopChecker(p, eos_token_ids=[0])
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    toks = []
    while not c.finished:
        t = Sampler().sample(logits, [p], banned_token_ids=[c.banned_token_ids()]).tolist()[0]
        toks.append(t)
        c.push(t, "")
    assert toks == [1, 1, 0] and c.finish_reason == "stop"


def test_logit_bias_moves_the_raw_logits():
    """OpenAI's logit_bias: added to the raw logits before anything else; +100 forces a token, -100 bans it."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0], [2.0, 1.0, 0.5, 0.0]])
    sampler = Sampler()
    greedy = SamplingParams(temperature=0.0)
    forced = SamplingParams(temperature=0.0, logit_bias={3: 100})
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100, 1: -100})
    out = sampler.sample(logits, [forced, greedy], [None, None])
    assert out.token_ids.tolist() == [3, 0]
    assert sampler.sample(logits[:1], [banned], [None]).token_ids.tolist() == [2]
    hot = SamplingParams(temperature=1.0, seed=0, logit_bias={2: 100})
    assert sampler.sample(logits[:1], [hot], [make_generator(0)]).token_ids.tolist() == [2]
    for bad in ({1: 101}, {-1: 1.0}, {"1": 1.0}, [1]):
        with pytest.raises(RequestError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_top_logprobs_ties_go_to_the_lower_id_whatever_the_batch():
    """torch.topk orders equal values as its kernel likes, which moves with the batch size; bfloat16 logits
    tie often, and a row's alternatives must not depend on its neighbours (batch invariance)."""
    from engine.sampling.sampler import top_logprobs

    row = torch.full((1, 300), -5.0)
    row[0, [250, 40, 7, 199]] = torch.tensor([1.0, 0.5, 0.5, 0.5])  # three tie for second place
    values, ids = top_logprobs(row, 3)
    assert ids == [[250, 7, 40]] and values == [[1.0, 0.5, 0.5]]
    batch = torch.cat([torch.randn(37, 300), row, torch.randn(20, 300)])
    assert top_logprobs(batch, 3)[1][37] == [250, 7, 40]
