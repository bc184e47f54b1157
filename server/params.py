"""From request bodies to engine inputs: prompt token ids, `SamplingParams`, `AttentionCapture`.

The rules are the engine's (engine/api/validation.py: token ids, numbers, text, the context and KV-pool
rules); here an engine `RequestError` becomes `APIError(400, ..., param=<this route's field>)`, so
chat's `max_completion_tokens` and `messages` are named as the client wrote them. Per-server caps
(`n`, stop strings, attention size) are checked here.

Attention size rule (`attention_values`): a request streams, per generated token and per captured
layer x head, one row over the whole context (full rows) or its top_k entries. Over a request of
P prompt tokens and M = max_tokens new tokens, the k-th token's row has P - 1 + k entries, so the sum of

    full rows:      layers x heads x (M * (P - 1) + M * (M + 1) / 2), once more for each of
                    `scores` and `value_norms`
    top_k:          layers x heads x sum_k min(top_k, P - 1 + k)
    spans:          layers x (heads, or 1 when heads are omitted: their average) x (spans + 2) x M
    prefill_matrix: layers x heads x P * (P + 1) / 2

must not exceed `settings.max_attention_values`; `top_k` may not exceed `settings.max_attention_top_k`.
Layers/heads omitted mean all of them, so full rows over every layer and head only fit short requests;
spans over every layer fit long ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from engine.api.llm import LLM
from engine.api.validation import check_request, resolve_max_tokens
from engine.cache.kv_policy import KVPolicy
from engine.capture.request import AttentionCapture, Span, char_span, token_char_offsets
from engine.core.checks import SEED_END, SEED_MIN, check_int, check_stop_limits, prompt_token_ids
from engine.core.errors import RequestError
from engine.sampling.params import SamplingParams
from engine.text.structured import StructuredOutput
from engine.text.tool_calls import Tool, check_tool_messages, template_takes_tools, tool_chat_inputs
from server.engine_loop import Submission
from server.errors import APIError
from server.protocol import AttentionRequest, ChatMessage, ResponseFormat, SamplingFields
from server.settings import ServerSettings

SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens", "kv_policy",
    "speculative",
)


def api_error(e: RequestError, renames: dict[str, str] | None = None) -> APIError:
    """The 400 for an engine `RequestError`, its field renamed to what this route calls it
    (`max_tokens` -> `max_completion_tokens`, `prompt` -> `messages`, ...)."""
    param, message = e.param, e.message
    if param is not None and renames:
        head = re.match(r"\w*", param).group(0)  # "stop_token_ids[2]" -> "stop_token_ids"
        if head in renames:
            param = renames[head] + param[len(head):]
            if message.startswith(e.param):  # "max_tokens must be >= 1", "stop_token_ids[0]: ..."
                message = param + message[len(e.param):]
    return APIError(400, message, param=param, code=e.code)


@contextmanager
def request_errors(renames: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the engine's `RequestError` into a 400 naming the route's field."""
    try:
        yield
    except RequestError as e:
        raise api_error(e, renames) from None


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def chat_prompt_ids(llm: LLM, messages: list[ChatMessage], param: str = "messages",
                    tools: Sequence[Tool] = ()) -> list[int]:
    """The prompt of a conversation, showing `tools` to the model and the earlier calls and their results
    as the checkpoint's template (or kvmini's default tool prompt) writes them: engine/text/tool_calls.py."""
    dicts = [m.template_dict() for m in messages]
    with request_errors({"messages": param}):
        check_tool_messages(dicts, "messages")
        chat, kwargs = tool_chat_inputs(dicts, tools,
                                        template_has_tools=template_takes_tools(llm.tokenizer.chat_templates))
        return llm.chat_prompt(chat, **kwargs)


def prompt_ids(llm: LLM, prompt: str | list[int], param: str = "prompt") -> list[int]:
    """A string or a token-id list. An empty result is refused by the context rules (`max_tokens_for`)."""
    with request_errors({"prompt": param}):
        return prompt_token_ids(prompt, llm.tokenizer, llm.config.vocab_size, "prompt")


def max_tokens_for(llm: LLM, num_prompt: int, max_tokens: int | None, *, prompt_param: str,
                   max_tokens_param: str = "max_tokens", body: SamplingFields | None = None) -> int:
    """The context rules (engine/api/validation.py `resolve_max_tokens`), errors naming this route's fields;
    `body`: the request, whose kv_policy (or the server's) lets max_tokens exceed the KV pool."""
    return _context_checked(resolve_max_tokens, num_prompt, max_tokens, llm.engine.limits,
                            prompt_param=prompt_param, max_tokens_param=max_tokens_param,
                            kv_policy=request_kv_policy(llm, body) if body is not None else None)


def request_kv_policy(llm: LLM, body: SamplingFields) -> KVPolicy | None:
    """The request's kv_policy (engine/cache/kv_policy.py), else the server's default."""
    with request_errors():
        policy = KVPolicy.coerce(body.kv_policy)
    return policy if policy is not None else llm.engine.kv_policy


def _context_checked(check, *args, prompt_param: str, max_tokens_param: str, **options):
    """Run a context check with this route's field names, so its message names them too."""
    with request_errors():
        return check(*args, prompt_param=prompt_param, max_tokens_param=max_tokens_param, **options)


def sampling_params(body: SamplingFields, settings: ServerSettings, *, max_tokens: int, logprobs: int | None,
                    seed: int | None, renames: dict[str, str] | None = None, prompt_logprobs: int | None = None,
                    grammar: StructuredOutput | None = None) -> SamplingParams:
    """`SamplingParams` from the body's sampling fields; a bad value becomes a 400 naming the field.
    `grammar`: the tool calls' (server/tools.py), in place of response_format's."""
    kwargs = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    kwargs.update(max_tokens=max_tokens, logprobs=logprobs, seed=seed, prompt_logprobs=prompt_logprobs)
    if body.logit_bias:  # JSON object keys are strings; the schema has checked that they are digits
        kwargs["logit_bias"] = {int(token): bias for token, bias in body.logit_bias.items()}
    kwargs["structured_output"] = grammar if grammar is not None else structured_output(body.response_format)
    with request_errors(renames):
        params = SamplingParams(**kwargs)
        check_stop_limits(params.stop, settings.max_stop_strings, settings.max_stop_length)
    return params


def submissions(llm: LLM, settings: ServerSettings, body: SamplingFields, ids: list[int], *, n: int,
                max_tokens: int, logprobs: int | None, renames: dict[str, str] | None = None,
                capture: AttentionCapture | None = None, prompt_logprobs: int | None = None,
                grammar: StructuredOutput | None = None) -> list[Submission]:
    """One engine request per choice, each checked against every rule the engine applies, so the
    engine thread never sees a request it will refuse. `grammar`: a tool-call grammar, compiled already."""
    if grammar is not None and body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tool calls: send tool_choice \"none\" for "
                            "a structured reply, or drop response_format", param="response_format")
    subs = []
    for seed in choice_seeds(body.seed, n):
        params = sampling_params(body, settings, max_tokens=max_tokens, logprobs=logprobs, seed=seed, renames=renames,
                                 prompt_logprobs=prompt_logprobs, grammar=grammar)
        names = renames or {}
        kv_policy = llm.engine.kv_policy_for(params)
        _context_checked(check_request, ids, params, llm.engine.limits, prompt_param=names.get("prompt", "prompt"),
                         max_tokens_param=names.get("max_tokens", "max_tokens"), kv_policy=kv_policy)
        if capture is not None and kv_policy is not None:
            raise APIError(400, f"attention cannot be captured with kv_policy {kv_policy}: its keys are not all "
                                "positions", param="kv_policy")
        if grammar is None:
            compile_grammar(llm, params.structured_output, body.response_format)
        subs.append(Submission(ids, params, capture))
    return subs


# The field a structured-output error names, by response_format type.
RESPONSE_FORMAT_PARAMS = {"json_object": "response_format", "json_schema": "response_format.json_schema.schema"}


def structured_output(fmt: ResponseFormat | None) -> StructuredOutput | None:
    """`response_format` as the engine's `StructuredOutput` (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    with _response_format_errors(fmt):
        if fmt.type == "json_object":
            return StructuredOutput(json_object=True)
        return StructuredOutput(json=fmt.json_schema.schema_)


def compile_grammar(llm: LLM, spec: StructuredOutput | None, fmt: ResponseFormat | None) -> None:
    """Compile the request's grammar here, in its worker thread: a schema the engine cannot compile is a 400
    naming the field, and the engine thread finds the grammar in its cache."""
    if spec is not None:
        with _response_format_errors(fmt):
            llm.engine.grammars.compile(spec)


@contextmanager
def _response_format_errors(fmt: ResponseFormat) -> Iterator[None]:
    try:
        yield
    except RequestError as e:
        raise APIError(400, e.message, param=RESPONSE_FORMAT_PARAMS[fmt.type], code=e.code) from None


def check_n(n: int, settings: ServerSettings) -> None:
    if not 1 <= n <= settings.max_n:
        raise APIError(400, f"n must be in [1, {settings.max_n}], got {n}", param="n")


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """Choice i of n runs with seed + i (wrapping within torch's seed range), so seeded choices differ
    but stay reproducible. The request's seed itself is checked first: 2**64 is refused, not wrapped."""
    with request_errors():
        check_int("seed", seed, SEED_MIN, SEED_END, allow_none=True)
    if seed is None:
        return [None] * n
    span = SEED_END - SEED_MIN
    return [(seed + i - SEED_MIN) % span + SEED_MIN for i in range(n)]


# ---- attention ---------------------------------------------------------------------------------------


def attention_capture(spec: AttentionRequest, llm: LLM, settings: ServerSettings, ids: list[int],
                      max_tokens: int, prompt_text: str | None = None) -> AttentionCapture:
    """Validate an attention request and check its size (module docstring); 400 naming the field.
    Character spans need the prompt as a string (`prompt_text`)."""
    cfg = llm.config
    with request_errors():
        capture = AttentionCapture(
            layers=spec.layers, heads=spec.heads, top_k=spec.top_k, prefill_matrix=spec.prefill_matrix,
            spans=_spans(spec.spans, llm, ids, prompt_text) if spec.spans is not None else None,
            rows=spec.rows, head_stats=spec.head_stats, scores=spec.scores, value_norms=spec.value_norms,
            head_stats_every=spec.head_stats_every)
        capture.validate(cfg.num_hidden_layers, cfg.num_attention_heads, len(ids))
    if capture.head_stats:
        llm.engine.separator_mask  # noqa: B018 - built once (0.3 s) here, in a worker thread, not on the engine's
    if spec.top_k is not None and spec.top_k > settings.max_attention_top_k:
        raise APIError(400, f"attention.top_k must be in [1, {settings.max_attention_top_k}], got {spec.top_k}",
                       param="attention.top_k")
    n = attention_values(capture, cfg.num_hidden_layers, cfg.num_attention_heads, len(ids), max_tokens)
    if n > settings.max_attention_values:
        raise APIError(
            400,
            f"attention dump too large: {n:,} values for {max_tokens} tokens over a {len(ids)}-token prompt "
            f"(see the size rule in the server docs), the limit is {settings.max_attention_values:,}; "
            "capture fewer layers/heads, set attention.top_k, use spans, or lower max_tokens",
            param="attention", code="attention_too_large",
        )
    return capture


def _spans(spans: list, llm: LLM, ids: list[int], prompt_text: str | None) -> list[Span]:
    """Token spans as given, or character spans mapped to the tokens that overlap them."""
    out, chars = [], {}
    for i, s in enumerate(spans):
        by_token, by_char = s.start is not None or s.end is not None, s.start_char is not None or s.end_char is not None
        if by_token == by_char or None in ((s.start, s.end) if by_token else (s.start_char, s.end_char)):
            raise RequestError(f"attention.spans[{i}]", "give a span either start and end (token positions) or "
                                                        "start_char and end_char (character offsets)")
        if by_token:
            out.append(Span(s.name, s.start, s.end))
        else:
            chars[i] = s
    if chars:
        if prompt_text is None:
            raise RequestError("attention.spans", "character spans need the prompt as a string; give token "
                                                  "positions (see /tokenize)")
        starts, ends = token_char_offsets(llm.tokenizer, ids, prompt_text)
        for i, s in sorted(chars.items()):
            out.insert(i, char_span(s.name, s.start_char, s.end_char, starts, ends))
    return out


def attention_values(capture: AttentionCapture, num_layers: int, num_heads: int, num_prompt: int,
                     max_tokens: int) -> int:
    layers, heads = len(capture.layers or range(num_layers)), len(capture.heads or range(num_heads))
    rows = layers * heads
    P, M = num_prompt, max_tokens
    total = 0
    if capture.full_rows or capture.scores or capture.value_norms:
        per_row = M * (P - 1) + M * (M + 1) // 2
        total += rows * per_row * (int(capture.full_rows) + int(capture.scores) + int(capture.value_norms))
    if capture.top_k is not None:
        k = capture.top_k
        # sum over j = 1..M of min(k, P - 1 + j)
        short = max(0, min(M, k - (P - 1)))  # tokens whose row is still shorter than k
        total += rows * (short * (P - 1) + short * (short + 1) // 2 + (M - short) * k)
    if capture.spans is not None:
        total += layers * (heads if capture.heads is not None else 1) * (len(capture.spans) + 2) * M
    if capture.prefill_matrix:
        total += rows * P * (P + 1) // 2
    return total
