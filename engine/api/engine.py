"""`LLMEngine`: continuous batching — requests join and leave between steps, one forward pass per step."""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass

import torch

from engine.api.validation import ContextLimits, check_request
from engine.cache.kv_policy import KVPolicy
from engine.capture.head_stats import HeadStats, separator_token_mask
from engine.capture.request import AttentionCapture
from engine.capture.sink import CaptureSink, CaptureState, ValueNorms
from engine.core.checks import prompt_token_ids
from engine.core.config import ModelConfig
from engine.core.errors import EngineDeadError, RequestError
from engine.core.outputs import RequestOutput, TokenLogprob
from engine.exec.runner import ModelRunner
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler, SamplerOutput, make_generator, score_tokens
from engine.sampling.speculative import DraftState, SpeculativeConfig
from engine.sampling.stop import StopChecker
from engine.sched.scheduler import Scheduler, SchedulerConfig
from engine.sched.sequence import ScheduledSeq, Sequence, SequenceIds
from engine.text.structured import GrammarCompiler, GrammarMatcher, TokenMasks
from engine.text.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("kvmini.engine")


@dataclass(eq=False)
class Request:
    """A sequence plus what turns its tokens into text: detokenizer, stop checker, logprobs so far, and with
    structured outputs the grammar's matcher."""

    request_id: str
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    logprobs: list[TokenLogprob] | None
    prompt_token_ids: list[int]  # handed to every RequestOutput (one list, never copied per step)
    grammar: GrammarMatcher | None = None
    draft: DraftState | None = None  # speculative decoding (engine/sampling/speculative.py), when this request takes it


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        scheduler_config: SchedulerConfig,
        max_model_len: int,
        kv_policy: KVPolicy | str | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        self.runner = runner
        self.speculative = speculative
        self.kv_policy = KVPolicy.coerce(kv_policy)  # for requests that give none (engine/cache/kv_policy.py)
        self.blocks = runner.blocks
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        # A prompt (or a preempted sequence's recompute) needs room for every token in each pool.
        pools = [runner.blocks.kv_cache] + ([runner.blocks.window.blocks.kv_cache] if runner.blocks.window else [])
        self.limits = ContextLimits(
            model_config.vocab_size, max_model_len, min(p.num_blocks for p in pools), runner.kv_cache.block_size
        )
        self.max_seq_len = self.limits.max_seq_len
        self.scheduler = Scheduler(scheduler_config, runner.blocks)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(sorted(set(tokenizer.eos_token_ids) | set(model_config.eos_token_ids)))
        self.grammars = GrammarCompiler(tokenizer, self.eos_token_ids)  # structured outputs; builds on first use
        self.requests: dict[str, Request] = {}
        self.seq_ids = SequenceIds()  # shared with sessions: ids stay unique per pool
        self._request_ids = itertools.count()
        self._separator_mask: torch.Tensor | None = None
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0  # speculative decoding, in all

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        capture: AttentionCapture | None = None,
    ) -> str:
        """Queue a request. Bad input raises `RequestError` (a ValueError naming the field), a request
        larger than the whole KV pool `RequestTooLargeError` (also a CacheFullError): whatever is
        accepted here cannot fail a step because of its input."""
        params = params or SamplingParams()
        ids = prompt_token_ids(prompt, self.tokenizer, self.limits.vocab_size)
        kv_policy = self.kv_policy_for(params)
        check_request(ids, params, self.limits, kv_policy=kv_policy)
        self.check_kv_policy(kv_policy, capture)
        grammar = self.grammars.matcher(params.structured_output) if params.structured_output is not None else None
        state = self.capture_state(capture, len(ids)) if capture is not None else None
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise RequestError("request_id", f"request_id {request_id!r} is already in use")
        seq = Sequence(self.seq_ids.next(), ids, len(ids), params, state, kv_policy=kv_policy)
        seq.generator = make_generator(params.seed, self.runner.device)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None] * len(ids)
        self.requests[request_id] = Request(
            request_id,
            seq,
            IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
            StopChecker(params, self.eos_token_ids, self.limits.max_seq_len_with(kv_policy), prompt_len=len(ids)),
            [] if params.logprobs is not None else None,
            list(ids),  # the sequence appends to `ids`; the prompt stays as it was
            grammar,
            self._draft_state(params, grammar, capture, kv_policy),
        )
        self.scheduler.add(seq)
        return request_id

    def _draft_state(self, params: SamplingParams, grammar: GrammarMatcher | None, capture: AttentionCapture | None,
                     kv_policy: KVPolicy | None) -> DraftState | None:
        """Speculation for a new request, unless it opts out or needs what a draft cannot give (a grammar
        that would have to roll back, captured rows, evicted keys): engine/sampling/speculative.py."""
        if self.speculative is None or not params.speculative:
            return None
        if grammar is not None or capture is not None or kv_policy is not None or self.blocks.window is not None:
            return None
        return DraftState.start(self.speculative)

    def check_kv_policy(self, kv_policy: KVPolicy | None, capture: AttentionCapture | None) -> None:
        """Eviction and capture go together only when nothing evicts: captured rows are indexed by position,
        and an evicting sequence's keys are not all positions."""
        tier = self.blocks.window
        if tier is not None and kv_policy is not None:
            raise RequestError("kv_policy", f"this engine runs head-aware eviction (its window heads keep "
                                            f"{tier.policy}); a request cannot set its own kv_policy")
        if capture is not None and (kv_policy is not None or tier is not None):
            what = f"kv_policy {kv_policy}" if kv_policy is not None else "head-aware eviction"
            raise RequestError("kv_policy" if kv_policy is not None else "attention",
                               f"attention capture cannot be combined with {what}")

    def kv_policy_for(self, params: SamplingParams) -> KVPolicy | None:
        """The request's own kv_policy, else the engine's default."""
        return params.kv_policy if params.kv_policy is not None else self.kv_policy

    def capture_state(self, capture: AttentionCapture, num_prompt_tokens: int) -> CaptureState:
        """Check a capture request against the model and the prompt; its state for one sequence."""
        cfg = self.model_config
        capture.validate(cfg.num_hidden_layers, cfg.num_attention_heads, num_prompt_tokens)
        state = CaptureState(capture, num_prompt_tokens)
        if capture.value_norms:
            state.value_norms = ValueNorms(self.runner.model, cfg.num_attention_heads // cfg.num_key_value_heads)
        if capture.head_stats:
            state.head_stats = HeadStats(capture.layers or range(cfg.num_hidden_layers),
                                         capture.heads or range(cfg.num_attention_heads),
                                         separator_mask=self.separator_mask, device=self.runner.device)
        return state

    @property
    def separator_mask(self) -> torch.Tensor:
        """Which vocabulary entries are separators or punctuation (the syntax score's keys), built once."""
        if self._separator_mask is None:
            # Kept on the host: HeadStats reads it there, once per new token.
            self._separator_mask = separator_token_mask(self.tokenizer, self.model_config.vocab_size)
        return self._separator_mask

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown/finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, "abort")
        text = req.stop.flush()
        return self._output(req, [], text, None, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and return one output per request that advanced.

        One request cannot take its batch down: if the batched pass fails, each scheduled sequence is
        run alone and only those that fail alone end, with finish_reason "error" (as does a request
        whose own bookkeeping fails); the others go on as if nothing happened."""
        work = self.scheduler.schedule()
        if not work:
            return []
        if self.speculative is not None:
            self._add_drafts(work)
        try:
            computed = self._compute(work)
        except EngineDeadError:
            raise  # no request is to blame, and running them one by one cannot help
        except Exception as e:
            log.warning("a step of %d sequences failed (%s: %s); running each alone", len(work), type(e).__name__, e)
            return self._step_alone(work)
        return self._advance_all(computed)

    def _add_drafts(self, work: list[ScheduledSeq]) -> None:
        """Give decoding sequences that speculate a draft, within the step's token budget and the free blocks
        (a draft never preempts anyone) and short of max_tokens."""
        budget = self.scheduler.config.max_num_batched_tokens - sum(w.num_tokens for w in work)
        by_seq = {id(r.seq): r for r in self.requests.values() if r.draft is not None}
        for w in work:
            req = by_seq.get(id(w.seq))
            if budget <= 0:
                break
            if req is None or not w.is_decode or w.seq.num_computed < w.seq.num_prompt_tokens:
                continue
            left = req.stop.max_new_tokens
            limit = budget if left is None else min(budget, left - req.stop.num_generated - 1)
            draft = req.draft.propose(w.seq.token_ids, limit)
            num_tokens = w.seq.num_computed + 1 + len(draft)
            if draft and self.blocks.can_reserve(w.seq.block_table, num_tokens):
                self.blocks.reserve(w.seq.block_table, num_tokens)
                w.draft = draft
                budget -= len(draft)

    def _compute(self, work: list[ScheduledSeq]) -> "_Computed":
        """The forward pass and sampling of one step; on failure, undone so the work can run again."""
        by_seq = {id(r.seq): r for r in self.requests.values()}
        saved = _StepState([w.seq for w in work])
        try:
            out = self.runner.run(work)
            self._collect_prefill_matrices(out.captures)
            for seq, first, logits in out.prompt_logits:
                top_n = seq.params.prompt_logprobs
                seq.prompt_logprobs[first : first + len(logits)] = score_tokens(
                    logits, seq.token_ids[first : first + len(logits)], top_n)
            reqs = [by_seq[id(s)] for s in out.sampled]
            drafts = {w.seq.seq_id: w.draft for w in work if w.draft}
            picks = self._verify(out.logits, reqs, drafts) if reqs else []
        except BaseException:
            saved.restore()
            raise
        return _Computed(reqs, picks, out.captures, drafts)

    def _step_alone(self, work: list[ScheduledSeq]) -> list[RequestOutput]:
        outputs = []
        for w in work:
            req = next((r for r in self.requests.values() if r.seq is w.seq), None)
            if req is None:
                continue
            try:
                computed = self._compute([w])
            except EngineDeadError:
                raise
            except Exception as e:
                outputs.append(self._fail(req, e))
                continue
            outputs += self._advance_all(computed)
        return outputs

    def _advance_all(self, computed: "_Computed") -> list[RequestOutput]:
        """One output per new token: a request whose draft was accepted advances by several tokens, each in
        its own output (as if decoded one by one) up to the one that finishes it."""
        outputs = []
        for req, picks in zip(computed.reqs, computed.picks):
            try:
                draft = computed.drafts.get(req.seq.seq_id)
                if draft:
                    self._record_draft(req, len(draft), len(picks) - 1)
                for sampled, row in picks:
                    outputs.append(self._advance(req, row, sampled, computed.captures.get(req.seq.seq_id)))
                    if outputs[-1].finished:
                        break
                else:
                    if draft:  # the accepted drafts' K/V stay, the rest is rolled back
                        self.runner.keep_accepted(req.seq, len(picks) - 1)
            except Exception as e:
                outputs.append(self._fail(req, e))
        return outputs

    def _record_draft(self, req: Request, drafted: int, accepted: int) -> None:
        req.draft.record(drafted, accepted)
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        """End a request that failed on its own: blocks back to the pool, an output carrying the error."""
        log.error("request %s failed", req.request_id, exc_info=error)
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req.seq, "error")
        out = self._output(req, [], "", None, "error")
        out.error = f"{type(error).__name__}: {error}"
        return out

    def _collect_prefill_matrices(self, captures: dict[int, CaptureSink]) -> None:
        """Keep each prompt chunk's attention matrices until the prompt's last chunk has run."""
        if not any(sink.matrices for sink in captures.values()):
            return  # the usual step: nobody asked for a prefill matrix
        by_id = {r.seq.seq_id: r for r in self.requests.values()}
        for seq_id, sink in captures.items():
            req = by_id.get(seq_id)
            if req is not None and sink.matrices and not req.seq.output_ids:
                req.seq.capture.keep_chunk(sink)

    def _verify(self, logits: torch.Tensor, reqs: list[Request], drafts: dict[int, list[int]]
                ) -> list[list[tuple[SamplerOutput, int]]]:
        """Each request's new tokens, as (sampler output, row) picks: its first row's token, and with a draft
        (engine/sampling/speculative.py) one more row's token for each draft token that the row before drew.

        Row j of every request still going is sampled in round j, as plain decoding would sample that token:
        same generator state, penalties and min_tokens counted over the drafts before it."""
        starts, row = [], 0
        for r in reqs:
            starts.append(row)
            row += 1 + len(drafts.get(r.seq.seq_id, ()))
        picks: list[list[tuple[SamplerOutput, int]]] = [[] for _ in reqs]
        going, j = list(range(len(reqs))), 0
        while going:
            rows = logits if row == len(reqs) else logits[[starts[i] + j for i in going]]
            going_reqs = [reqs[i] for i in going]
            if j == 0:  # no draft token taken yet: the plain step's sampling
                sampled = self._sample(rows, going_reqs)
            else:
                sampled = self._sample(rows, going_reqs, [drafts[r.seq.seq_id][:j] for r in going_reqs])
            still = []
            for n, i in enumerate(going):
                picks[i].append((sampled, n))
                draft = drafts.get(reqs[i].seq.seq_id, ())
                if j < len(draft) and int(sampled.token_ids[n]) == draft[j]:
                    still.append(i)
            going, j = still, j + 1
        return picks

    def _sample(self, logits: torch.Tensor, reqs: list[Request], accepted: list[list[int]] | None = None
                ) -> SamplerOutput:
        """Sample one row per request; `accepted[i]`: draft tokens of request i taken before this row."""
        seqs = [r.seq for r in reqs]
        accepted = accepted if accepted is not None else [[] for _ in reqs]
        # Token histories are copied only when a penalty reads them (the sampler reads no other).
        penalties = any(s.params.has_penalties for s in seqs)
        return self.sampler.sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs] if penalties else None,
            output_token_ids=[s.output_ids + a for s, a in zip(seqs, accepted)] if penalties else None,
            # A grammar decides itself when its output may end: no min_tokens ban on its rows.
            banned_token_ids=[(r.stop.banned_token_ids(r.stop.num_generated + len(a)) or None)
                              if r.grammar is None else None for r, a in zip(reqs, accepted)],
            token_masks=TokenMasks.from_matchers([r.grammar for r in reqs]),
        )

    def _advance(self, req: Request, row: int, sampled: SamplerOutput, sink: CaptureSink | None) -> RequestOutput:
        seq = req.seq
        token = int(sampled.token_ids[row])
        if req.grammar is not None:
            req.grammar.accept(token)  # a GrammarError fails this request alone
        query_position = seq.num_tokens - 1
        seq.token_ids.append(token)
        if req.stop.is_stop_token(token):
            # Its own text is not output, but a byte run it ends (held by the detokenizer) is.
            delta = req.detokenizer.flush()
        else:
            delta = req.detokenizer.add(token)
        text, reason = req.stop.push(token, delta)
        # Complete JSON that nothing but EOS may follow: stop now, without a step to sample the EOS.
        grammar_done = reason != "stop" and req.grammar is not None and req.grammar.is_finished
        logprob = None
        if req.logprobs is not None:
            top = list(zip(sampled.top_token_ids[row] or [], sampled.top_logprobs[row] or []))
            logprob = TokenLogprob(token, float(sampled.logprobs[row]), top)
            req.logprobs.append(logprob)
        attention = None
        if sink is not None:
            attention = seq.capture.rows(sink, [query_position])
            if attention[0].prefill is not None:
                seq.capture.update_stats_from_prompt(attention[0].prefill, seq.token_ids)
            seq.capture.update_stats(sink, [query_position], seq.token_ids)
        if reason == "length" or grammar_done:  # no stop string can follow; release the text still held back
            text += req.stop.flush()  # (held back by the stop checker; "length" has released it)
            tail = req.detokenizer.flush()
            text += tail
            req.stop.text += tail
            reason = "stop" if grammar_done else reason
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[req.request_id]
        return self._output(req, [token], text, logprob, reason, attention)

    def _output(self, req, new_ids, new_text, logprob, reason, attention=None) -> RequestOutput:
        seq = req.seq
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            num_output_tokens=seq.num_tokens - seq.num_prompt_tokens,
            all_token_ids=seq.token_ids,
            text=req.stop.text,
            new_token_ids=new_ids,
            new_text=new_text,
            finish_reason=reason,
            stop_reason=req.stop.stop_reason,
            logprobs=req.logprobs,
            new_logprobs=[logprob] if logprob is not None else ([] if req.logprobs is not None else None),
            attention=attention,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            head_stats=seq.capture.head_stats if seq.capture is not None else None,
            head_stats_snapshot=self._head_stats_snapshot(seq, new_ids, reason),
            prompt_logprobs=seq.prompt_logprobs,
            num_draft_tokens=req.draft.num_drafted if req.draft is not None else 0,
            num_accepted_tokens=req.draft.num_accepted if req.draft is not None else 0,
        )

    @staticmethod
    def _head_stats_snapshot(seq: Sequence, new_ids: list[int], reason: str | None):
        """A copy of the statistics on every `head_stats_every`-th token (under 1 ms for 270 heads)."""
        capture = seq.capture
        every = capture.spec.head_stats_every if capture is not None else None
        if not every or not new_ids or reason is not None or capture.head_stats is None:
            return None
        if (seq.num_tokens - seq.num_prompt_tokens) % every:
            return None
        return copy.deepcopy(capture.head_stats)

    # ---- accounting --------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        a = self.blocks.allocator
        q = self.blocks.prefix_queries
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": a.num_blocks,
            "kv_blocks_used": a.num_used,
            "kv_blocks_free": a.num_free,
            "prefix_cache_queries": q,
            "prefix_cache_hits": self.blocks.prefix_hits,
            "prefix_cache_hit_rate": self.blocks.prefix_hits / q if q else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
        } | self._window_stats()

    def _window_stats(self) -> dict[str, float]:
        """Head-aware eviction: the window heads' pool (engine/cache/head_plan.py)."""
        if self.blocks.window is None:
            return {}
        a = self.blocks.window.blocks.allocator
        return {"kv_window_blocks_total": a.num_blocks, "kv_window_blocks_used": a.num_used}


@dataclass
class _Computed:
    """A step's forward pass and sampling, before the requests advance."""

    reqs: list[Request]  # in logits-row order
    picks: list[list[tuple[SamplerOutput, int]]]  # each request's new tokens: (sampler output, its row)
    captures: dict[int, CaptureSink]
    drafts: dict[int, list[int]]  # seq_id -> the draft its step verified


class _StepState:
    """What a failed step must undo before its sequences run again: how much of each sequence the cache
    holds (the slots it wrote are simply written again), the prompt chunks kept for attention, and the
    state of each seeded generator (so that a retry draws the same token)."""

    def __init__(self, seqs: list[Sequence]):
        self.items = [
            (seq, seq.block_table.num_cached_tokens, len(seq.capture.prefill_chunks) if seq.capture else 0,
             seq.generator.get_state() if seq.generator is not None else None)
            for seq in seqs
        ]

    def restore(self) -> None:
        for seq, num_cached, num_chunks, generator_state in self.items:
            seq.block_table.set_cached(num_cached)
            if seq.capture is not None:
                del seq.capture.prefill_chunks[num_chunks:]
            if generator_state is not None:
                seq.generator.set_state(generator_state)
