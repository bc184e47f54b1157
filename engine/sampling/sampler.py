"""A batched, vectorised sampler. `Sampler.sample` turns one step's logits for a
whole batch (each row with its own `SamplingParams`, engine/sampling/params.py) into next-token ids.

Pipeline, per row, applied to the whole batch with tensor ops (a stage no row needs is skipped):

    logits (any float dtype) -> float32 copy
    1. banned ids -> -inf            (min_tokens: eos / stop ids the row may not produce yet; structured
                                     outputs: every token the row's grammar does not allow, engine/text/structured.py)
    2. penalties                     repetition over prompt+output tokens (positive logits divided,
                                     negative multiplied), then frequency (x count) and presence
                                     (x [count > 0]) subtracted, over output tokens only (vLLM)
    3. logprobs                      log_softmax of these penalised logits (before temperature and
                                     the top-k/p/min-p filters), for rows that ask for them
    4. greedy rows (temperature < 1e-5): argmax of the penalised logits
    5. sampled rows: temperature -> top_k -> top_p -> min_p -> softmax -> exponential race

Sampling uses the exponential-race trick: argmax(probs / q) with q ~ Exponential(1) i.i.d. picks
index i with probability probs[i] (q = -log U, U uniform). q is drawn row by row from that row's
own `torch.Generator` (rows whose request has a seed) or, in one draw, from the sampler's shared
generator (rows without). A seeded row therefore consumes exactly V draws of its own generator per
sampled step, so its tokens do not depend on what else is in the batch, nor on the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.core.outputs import TokenLogprob
from engine.sampling.params import SamplingParams
from engine.text.structured import TokenMasks

FLOAT32_MAX = torch.finfo(torch.float32).max
# top-p without top-k first tries the top this-many logits (see apply_top_k_top_p).
TOP_P_CANDIDATES = 1024

# One row's token history: a list of ids or a 1-D integer tensor (cached tensors avoid a conversion).
TokenIds = Sequence[int] | torch.Tensor


def score_tokens(logits: torch.Tensor, token_ids: Sequence[int], top_n: int | None) -> list[TokenLogprob]:
    """Each row's logprob of the given token (row i scores `token_ids[i]`) and its `top_n` alternatives,
    from raw logits `[n, vocab]`: how forced tokens are scored (a session's `feed`, prompt logprobs)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device).view(-1, 1)).squeeze(1).tolist()
    if not top_n:
        return [TokenLogprob(t, v) for t, v in zip(token_ids, chosen)]
    values, ids = top_logprobs(lp, min(top_n, lp.shape[-1]))
    return [TokenLogprob(t, v, list(zip(i, tv))) for t, v, i, tv in zip(token_ids, chosen, ids, values)]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for a seeded request (None without a seed).

    Create it once when the request is admitted, keep it with the sequence, pass it to every
    `Sampler.sample` call for that row; it must live on the logits' device."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplerOutput:
    """One step's result. `token_ids[i]` is row i's next token. For rows whose params have
    `logprobs=None` the logprob fields are None; otherwise `logprobs[i]` is the chosen token's
    logprob and `top_token_ids[i]` / `top_logprobs[i]` the n most likely ids and their logprobs,
    descending (empty lists when n = 0)."""

    token_ids: torch.Tensor
    logprobs: list[float | None] = field(default_factory=list)
    top_token_ids: list[list[int] | None] = field(default_factory=list)
    top_logprobs: list[list[float] | None] = field(default_factory=list)

    def tolist(self) -> list[int]:
        return self.token_ids.tolist()


# --------------------------------------------------------------------------------------------------
# Batched logit stages. Each takes float logits [B, V] and per-row parameter tensors [B]; each
# works in place where it can and returns the processed logits.


def _flat(rows: Sequence[TokenIds], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of a ragged batch of id lists, as two flat LongTensors."""
    lengths = [len(r) for r in rows]
    if all(isinstance(r, torch.Tensor) for r in rows):
        ids = torch.cat([r.reshape(-1).to(device=device, dtype=torch.long) for r in rows]) if rows else None
    else:
        flat: list[int] = []
        for r in rows:
            flat.extend(r.tolist() if isinstance(r, torch.Tensor) else r)
        ids = torch.tensor(flat, dtype=torch.long, device=device)
    if ids is None:
        ids = torch.empty(0, dtype=torch.long, device=device)
    row_idx = torch.repeat_interleave(
        torch.arange(len(rows), device=device), torch.tensor(lengths, dtype=torch.long, device=device)
    )
    return row_idx, ids


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[TokenIds],
    output_token_ids: Sequence[TokenIds],
    repetition_penalty: torch.Tensor | None = None,
    presence_penalty: torch.Tensor | None = None,
    frequency_penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM penalties, in place on `logits` [B, V]; each penalty is a [B] tensor or None (= off).

    Repetition: every token seen in the prompt or the output has its logit divided by the penalty
    when positive, multiplied when negative. Then `logit -= frequency * count_in_output` and
    `logit -= presence * (count_in_output > 0)`. Histories are per-row lists / 1-D tensors of ids."""
    B, V = logits.shape
    dev = logits.device
    counts = torch.zeros(B, V, dtype=logits.dtype, device=dev)
    r, t = _flat(output_token_ids, dev)
    counts.index_put_((r, t), torch.ones_like(t, dtype=logits.dtype), accumulate=True)
    seen_out = counts > 0
    if repetition_penalty is not None:
        seen = seen_out.clone()
        r, t = _flat(prompt_token_ids, dev)
        seen[r, t] = True
        rep = repetition_penalty.to(logits.dtype)[:, None]
        penalised = torch.where(logits < 0, logits * rep, logits / rep)
        logits.copy_(torch.where(seen, penalised, logits))
    if frequency_penalty is not None:
        logits.sub_(frequency_penalty.to(logits.dtype)[:, None] * counts)
    if presence_penalty is not None:
        logits.sub_(presence_penalty.to(logits.dtype)[:, None] * seen_out)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature per row (in place); temperature [B] must be > 0."""
    return logits.div_(temperature.to(logits.dtype)[:, None])


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask to -inf what top-k then top-p removes (transformers' TopK then TopP warper rules), in place.

    top_k [B] (long; <= 0 = off): drop logits below the k-th largest (ties with it are kept).
    top_p [B] (float; 1 = off): sort ascending, drop tokens whose cumulative probability is
    <= 1 - top_p, always keeping the most likely token.

    Fast path: only the top C logits of each row are sorted (C = the largest k, or
    TOP_P_CANDIDATES for a top-p row without top-k), valid when nothing outside them can survive
    (no tie with the k-th value spills past C; for top-p without top-k, the probability outside
    the candidates is below 1 - top_p, so all of it is cut). Otherwise one full sort."""
    B, V = logits.shape
    neg_inf = float("-inf")
    dev = logits.device
    k_on = torch.zeros(B, dtype=torch.bool, device=dev)
    k = torch.full((B,), V, dtype=torch.long, device=dev)
    if top_k is not None:
        top_k = top_k.to(device=dev, dtype=torch.long)
        k_on = (top_k > 0) & (top_k < V)
        k = top_k.clamp(1, V).masked_fill(~k_on, V)
    p_on = torch.zeros(B, dtype=torch.bool, device=dev)
    threshold = torch.zeros(B, 1, dtype=torch.float32, device=dev)
    if top_p is not None:
        # 1 - p in float64, then float32: the same threshold transformers compares against.
        threshold = (1 - top_p.to(device=dev, dtype=torch.float64)).to(torch.float32)[:, None]
        p_on = threshold.squeeze(1) > 0
    any_k, any_p = bool(k_on.any()), bool(p_on.any())
    if not (any_k or any_p):
        return logits

    p_only = p_on & ~k_on
    C = int(k.masked_fill(~k_on, 1).max()) if any_k else 1
    if bool(p_only.any()):
        C = max(C, TOP_P_CANDIDATES)
    if C < V:
        vals, idx = logits.topk(C, dim=-1)  # descending
        kth = vals.gather(1, (k.clamp(max=C) - 1)[:, None]).masked_fill_(~k_on[:, None], neg_inf)
        ok = not any_k or not bool((((logits >= kth).sum(dim=-1) > C) & k_on).any())
        if ok and not any_p:
            return logits.masked_fill_(logits < kth, neg_inf)
        if ok:
            cand, cand_idx = vals.flip(-1), idx.flip(-1)  # ascending
            cand.masked_fill_(cand < kth, neg_inf)
            # Top-k rows: nothing outside the candidates survives, normalise over them. Others:
            # normalise over the whole row; `outside` is the mass the candidates leave out.
            norm = torch.where(k_on[:, None], cand.logsumexp(-1, keepdim=True), logits.logsumexp(-1, keepdim=True))
            probs = (cand - norm).exp_()
            outside = (1 - probs.sum(-1, keepdim=True)).clamp_min_(0).masked_fill_(k_on[:, None], 0)
            ok = not bool(((outside > threshold - 1e-6) & p_only[:, None]).any())
        if ok:
            remove = ((probs.cumsum_(dim=-1) + outside) <= threshold) & p_on[:, None]
            remove[:, -1] = False
            if any_k:
                logits.masked_fill_(logits < kth, neg_inf)
            logits.masked_fill_(p_only[:, None], neg_inf)  # all but the candidates, written back next
            return logits.scatter_(1, cand_idx, cand.masked_fill_(remove, neg_inf))

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    if any_k:
        kth = sorted_logits.gather(1, (V - k)[:, None])  # k = V (off) -> the minimum: nothing dropped
        sorted_logits.masked_fill_(sorted_logits < kth, neg_inf)
    if any_p:
        remove = (sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= threshold) & p_on[:, None]
        remove[:, -1] = False
        sorted_logits.masked_fill_(remove, neg_inf)
    return logits.scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (max probability) of their row; min_p [B]
    (0 = off). The most likely token always survives."""
    probs = logits.softmax(dim=-1)
    thresh = probs.amax(dim=-1, keepdim=True) * min_p.to(probs.dtype)[:, None]
    return logits.masked_fill_(probs < thresh, float("-inf"))


def _banned_rows(banned: Sequence[Sequence[int] | None] | None) -> list[int]:
    if banned is None:
        return []
    return [i for i, b in enumerate(banned) if b is not None and len(b) > 0]


def _row_tensor(values: list, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[TokenIds] | None = None,
    output_token_ids: Sequence[TokenIds] | None = None,
    banned_token_ids: Sequence[Sequence[int] | None] | None = None,
    token_masks: TokenMasks | None = None,
    *,
    filters: bool = True,
) -> torch.Tensor:
    """The logits each row samples from: a float32 copy of `logits` after banned ids and `token_masks` (the
    structured-output rows' allowed tokens), penalties and (with `filters`) temperature -> top_k -> top_p ->
    min_p. Greedy rows get no temperature or filters (their argmax is taken as is). `softmax` of the result
    is the sampling distribution. Stages no row needs are skipped; the sampler uses this exact path."""
    B = logits.shape[0]
    if len(params) != B:
        raise ValueError(f"got {len(params)} SamplingParams for {B} rows of logits")
    x = logits.to(torch.float32, copy=True)
    for i, p in enumerate(params):
        if p._bias is not None:
            ids, values = p._bias
            x[i].index_add_(0, ids.to(x.device), values.to(x.device))
    rows = _banned_rows(banned_token_ids)
    if rows:
        r, t = _flat([banned_token_ids[i] for i in rows], x.device)
        x[torch.tensor(rows, dtype=torch.long, device=x.device)[r], t] = float("-inf")
    if token_masks is not None:
        token_masks.apply(x)

    pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
    if pen_rows:
        ps = [params[i] for i in pen_rows]
        if output_token_ids is None:
            raise ValueError("output_token_ids are required when a row has penalties")
        need_prompt = any(p.repetition_penalty != 1.0 for p in ps)
        if need_prompt and prompt_token_ids is None:
            raise ValueError("prompt_token_ids are required when a row has a repetition penalty")
        sub = x if len(pen_rows) == B else x[pen_rows]
        apply_penalties(
            sub,
            [prompt_token_ids[i] for i in pen_rows] if need_prompt else [[] for _ in pen_rows],
            [output_token_ids[i] for i in pen_rows],
            _row_tensor([p.repetition_penalty for p in ps], x, torch.float32) if need_prompt else None,
            _row_tensor([p.presence_penalty for p in ps], x, torch.float32)
            if any(p.presence_penalty for p in ps)
            else None,
            _row_tensor([p.frequency_penalty for p in ps], x, torch.float32)
            if any(p.frequency_penalty for p in ps)
            else None,
        )
        if sub is not x:
            x[pen_rows] = sub
        x.clamp_(max=FLOAT32_MAX)  # a tiny repetition penalty can overflow a logit to inf: softmax would give NaN
    if not filters:
        return x
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return x
    sub = x if len(rows) == B else x[rows]
    _filter(sub, [params[i] for i in rows])
    if sub is not x:
        x[rows] = sub
    return x


def _filter(x: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature -> top_k -> top_p -> min_p, in place, for non-greedy rows `x` [n, V]."""
    if any(p.temperature != 1.0 for p in ps):
        apply_temperature(x, _row_tensor([p.temperature for p in ps], x, torch.float32)).clamp_(max=FLOAT32_MAX)
    use_k = any(p.top_k > 0 for p in ps)
    use_p = any(p.top_p < 1.0 for p in ps)
    if use_k or use_p:
        apply_top_k_top_p(
            x,
            _row_tensor([p.top_k for p in ps], x, torch.long) if use_k else None,
            _row_tensor([p.top_p for p in ps], x, torch.float64) if use_p else None,
        )
    if any(p.min_p > 0.0 for p in ps):
        apply_min_p(x, _row_tensor([p.min_p for p in ps], x, torch.float32))
    return x


def top_logprobs(lp: torch.Tensor, n: int) -> tuple[list[list[float]], list[list[int]]]:
    """The `n` largest logprobs of each row of `lp` [B, V] and their ids, descending, ties by lower id.

    `torch.topk` leaves the order of equal values to its kernel, which moves with the batch size (bfloat16
    logits tie often): a row's alternatives must not depend on its neighbours."""
    top_v, top_i = lp.topk(n, dim=-1)
    kth = top_v[:, -1:]
    # Rows without a tie among their top n (nor with the n-th) keep topk's order; only tied rows are re-sorted.
    tied_rows = ((lp >= kth).sum(dim=-1) > n) | (top_v[:, 1:] == top_v[:, :-1]).any(dim=-1)
    values, ids = top_v.tolist(), top_i.tolist()
    for r in tied_rows.nonzero().flatten().tolist():
        tied = (lp[r] >= kth[r]).nonzero().squeeze(1)  # ascending ids: every value the n-th is tied with
        v, order = torch.sort(lp[r, tied], descending=True, stable=True)
        values[r], ids[r] = v[:n].tolist(), tied[order[:n]].tolist()
    return values, ids


class Sampler:
    """Picks next tokens for a batch whose rows each carry their own `SamplingParams`.

    `seed` seeds the shared generator used by rows without a per-request generator (None = random).
    """

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        g = self._shared.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(self._seed)
            self._shared[device] = g
        return g

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        prompt_token_ids: Sequence[TokenIds] | None = None,
        output_token_ids: Sequence[TokenIds] | None = None,
        banned_token_ids: Sequence[Sequence[int] | None] | None = None,
        token_masks: TokenMasks | None = None,
    ) -> SamplerOutput:
        """Next token for every row of `logits` [B, V] (any float dtype, any device).

        params[i]: row i's SamplingParams. generators[i]: row i's per-request generator (from
        `make_generator`, required when params[i].seed is set; None = the shared generator).
        prompt_token_ids[i] / output_token_ids[i]: row i's prompt / generated ids so far (list of
        ints or 1-D integer tensor); only read for rows with penalties (output ids for any penalty,
        prompt ids for repetition). banned_token_ids[i]: ids row i must not produce this step
        (e.g. `StopChecker.banned_token_ids()` under min_tokens), or None. token_masks: the tokens the
        constrained rows may produce (structured outputs), None when no row is constrained.
        """
        B, V = logits.shape
        if len(params) != B:
            raise ValueError(f"got {len(params)} SamplingParams for {B} rows of logits")
        if generators is None:
            generators = [None] * B
        elif len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for {B} rows of logits")
        for i, p in enumerate(params):
            if p.seed is not None and generators[i] is None:
                raise ValueError(f"row {i} has seed={p.seed} but no generator (use make_generator once per request)")

        if B == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.long, device=logits.device))
        want_lp = [p.logprobs is not None for p in params]
        all_greedy = all(p.is_greedy for p in params)
        if (
            all_greedy
            and not any(want_lp)
            and not any(p.has_penalties or p.logit_bias for p in params)
            and not _banned_rows(banned_token_ids)
            and token_masks is None
        ):
            return SamplerOutput(logits.argmax(dim=-1), [None] * B, [None] * B, [None] * B)

        x = process_logits(logits, params, prompt_token_ids, output_token_ids, banned_token_ids, token_masks,
                           filters=False)

        lp_rows = [i for i in range(B) if want_lp[i]]
        lp = torch.log_softmax(x[lp_rows] if len(lp_rows) < B else x, dim=-1) if lp_rows else None

        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        whole = len(rows) == B
        if not whole:
            token_ids = x.argmax(dim=-1)  # greedy rows: argmax of the penalised logits
        if rows:
            sub = x if whole else x[rows]
            ps = [params[i] for i in rows]
            _filter(sub, ps)
            probs = sub.softmax(dim=-1)
            q = self._exponentials(probs, [generators[i] for i in rows])
            chosen = probs.div_(q).argmax(dim=-1)
            if whole:
                token_ids = chosen
            else:
                token_ids[torch.tensor(rows, dtype=torch.long, device=x.device)] = chosen

        out = SamplerOutput(token_ids, [None] * B, [None] * B, [None] * B)
        if lp_rows:
            idx = token_ids if len(lp_rows) == B else token_ids[lp_rows]
            chosen_lp = lp.gather(1, idx[:, None]).squeeze(1).tolist()
            n_max = min(max(params[i].logprobs for i in lp_rows), V)
            if n_max > 0:
                top_v, top_i = top_logprobs(lp, n_max)
            for j, i in enumerate(lp_rows):
                n = min(params[i].logprobs, V)
                out.logprobs[i] = chosen_lp[j]
                out.top_token_ids[i] = top_i[j][:n] if n else []
                out.top_logprobs[i] = top_v[j][:n] if n else []
        return out

    def _exponentials(self, probs: torch.Tensor, gens: Sequence[torch.Generator | None]) -> torch.Tensor:
        """q ~ Exponential(1) with probs' shape; row j drawn from gens[j], or the shared generator."""
        n, V = probs.shape
        q = torch.empty_like(probs)
        shared_rows = [j for j, g in enumerate(gens) if g is None]
        if len(shared_rows) == n:
            q.uniform_(generator=self.shared_generator(probs.device))
        else:
            if shared_rows:
                draw = torch.empty(len(shared_rows), V, dtype=probs.dtype, device=probs.device)
                q[shared_rows] = draw.uniform_(generator=self.shared_generator(probs.device))
            for j, g in enumerate(gens):
                if g is not None:
                    # A fresh [V] draw per row: its generator advances the same whatever the batch.
                    q[j] = torch.empty(V, dtype=probs.dtype, device=probs.device).uniform_(generator=g)
        # Exponential(1) = -log(U), U ~ Uniform[0, 1): same law as exponential_(), several times
        # cheaper on CPU. U = 0 gives q = inf, i.e. that token loses this race (probability 2**-24).
        return q.log_().neg_()
