"""The live page (`GET /`: server/page.py, server/static/live.html) and the `kvmini attn` report, in a real browser.

playwright drives Debian's Chromium headless (`executable_path`: `playwright install` is never needed) against a
live server over a tiny random model; one test uses the default model and takes the README's screenshot. Every
request the page makes is recorded: none may leave the server's origin. Without Chromium or playwright the
browser tests skip and say why; the header checks run anyway.

Screenshots go to the test's tmp_path, or to $KVMINI_SCREENSHOT_DIR when set; docs/img/live-page.png comes from
`KVMINI_SCREENSHOT_DIR=docs/img .venv/bin/python -m pytest tests/test_page.py -k default_model`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from browser import chromium
from checkpoints import make_checkpoint
from engine import LLM
from live_server import LiveServer
from server import ServerSettings, create_app

KEY = "page-key"
PLAYWRIGHT_MISSING = "the browser test needs playwright (the test extra): make setup installs it"
PROMPT = "Doc 1: the cat sat. Doc 2: a dog ran. Q: who sat?"  # byte tokenizer: one token per character
FINISHED = ", ".join(f"body[data-state={s}]" for s in ("done", "error", "ended", "stopped"))
TRANSPARENT = "rgba(0, 0, 0, 0)"
# A tool whose arguments the grammar bounds (an enum, no other keys): even a random model's call completes.
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                   "additionalProperties": False}}}


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("page") / "tiny"
    make_checkpoint(out, num_kv_heads=2, num_heads=4, hidden=64, layers=2)
    return out


@pytest.fixture(scope="module")
def tiny_llm(tiny_model) -> LLM:
    return LLM(tiny_model, dtype="float32", num_blocks=64, max_model_len=256)


@pytest.fixture(scope="module")
def tool_llm(tmp_path_factory) -> LLM:
    """Room for tools: their preamble in the system message is ~600 tokens of the byte tokenizer."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("page") / "tiny-tools"
    make_checkpoint(out, num_kv_heads=2, num_heads=4, hidden=64, layers=2, max_position_embeddings=1024)
    return LLM(out, dtype="float32", num_blocks=128, max_model_len=1024)


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@dataclass
class Tab:
    """A page in its own browser context, with every request it made and every script error it met."""

    page: object
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (url, Authorization header)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and CSP refusals

    def requested_paths(self) -> list[str]:
        return [urlsplit(url).path for url, _ in self.requests]


@pytest.fixture()
def tab(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    t = Tab(context.new_page())
    t.page.on("request", lambda r: t.requests.append((r.url, r.headers.get("authorization"))))
    t.page.on("pageerror", lambda e: t.errors.append(str(e)))
    t.page.on("console", lambda m: t.errors.append(m.text) if "Content Security Policy" in m.text else None)
    yield t
    context.close()


# ---- helpers -----------------------------------------------------------------------------------------------
def open_page(tab: Tab, url: str):
    response = tab.page.goto(url + "/")
    tab.page.wait_for_selector("body[data-state=ready]")
    return response


def set_prompt(page, text: str, mode: str = "completion") -> None:
    page.check(f"input[name=mode][value={mode}]")
    page.fill("#prompt", text)


def add_span(page, name: str, start: int, end: int) -> None:
    """Select characters start..end of the prompt box, as a person would with the mouse, and add the span."""
    page.evaluate("([a, b]) => { const t = document.getElementById('prompt'); t.focus(); t.setSelectionRange(a, b);"
                  " t.dispatchEvent(new Event('select')); }", [start, end])
    page.fill("#span-name", name)
    page.click("#add-span")


def generate(page, max_tokens: int = 12, timeout_s: float = 30) -> str:
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#generate")
    page.wait_for_selector(FINISHED, timeout=timeout_s * 1000)
    return page.get_attribute("body", "data-state")


def turn_tools_on(page, tools: list | str, tool_choice: str = "auto") -> None:
    page.click("#tools-box summary")  # the section starts closed
    page.check("#use-tools")
    page.fill("#tools", tools if isinstance(tools, str) else json.dumps(tools))
    page.select_option("#tool_choice", tool_choice)


def backgrounds(page) -> list[str]:
    return page.eval_on_selector_all("#text .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")


def brightness(colour: str) -> int:
    return sum(int(x) for x in re.findall(r"\d+", colour)[:3])


def screenshot(page, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("KVMINI_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    return path


def assert_same_origin(tab: Tab, origin: str) -> None:
    outside = [url for url, _ in tab.requests if not (url.startswith(origin + "/") or url.startswith("data:"))]
    assert not outside, f"the page reached outside {origin}: {outside}"
    assert not tab.errors, tab.errors


# ---- the page over HTTP (no browser) ------------------------------------------------------------------------
def test_page_is_open_self_contained_and_locked_down(tiny_llm):
    with LiveServer(create_app(tiny_llm, ServerSettings(api_key=KEY))) as live, httpx.Client(base_url=live.url) as http:
        r = http.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page, csp = r.text, r.headers["content-security-policy"]
        # nothing to fetch from anywhere: no script or style files, no links out, no CDN
        assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|https?://|url\(", page)
        policy = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["img-src"] == "data:"
        [script] = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)  # the one script, allowed by its hash
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert policy["script-src"] == f"'sha256-{digest}'"
        assert '"previous-token":"#1f77b4"' in page  # the report's label colours were filled in
        # the page is open; what it calls is not
        assert http.post("/generate", json={"prompt": "a"}).status_code == 401
        assert http.get("/v1/models").status_code == 401
        spec = http.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert "/" not in spec["paths"]


# ---- the page in Chromium ----------------------------------------------------------------------------------
def test_live_page_streams_tokens_and_draws_attention(tiny_llm, tab, tmp_path):
    page = tab.page
    with LiveServer(create_app(tiny_llm)) as live:
        response = open_page(tab, live.url)
        assert "content-security-policy" in response.headers
        page.wait_for_selector("#model:has-text('tiny')")
        set_prompt(page, PROMPT)
        add_span(page, "doc1", 0, 19)
        assert page.inner_text("#span-list").startswith("doc1")
        with page.expect_response(lambda r: r.url.endswith("/generate")) as generated:
            state = generate(page, max_tokens=12)
        assert state == "done", page.inner_text("#error")
        assert generated.value.headers["content-type"].startswith("text/event-stream")
        assert re.search(r"done: \w+, \d+ tokens", page.inner_text("#status"))

        # the text: the prompt's tokens, then one token per streamed event
        n_prompt = len(PROMPT)
        tokens = page.locator("#text .tok")
        gen = page.locator("#text .tok.gen")
        n_gen = gen.count()
        assert tokens.count() == n_prompt + n_gen and 1 <= n_gen <= 12
        # the span's tokens are marked under the text, and the span view has one bar per token
        marked = page.eval_on_selector_all("#text .tok.sp", "els => els.map(e => e.textContent).join('')")
        assert marked == PROMPT[:19]
        assert page.locator("#span-bars .sbar").count() == n_gen and "doc1" in page.inner_text("#span-view")

        # click a generated token: its query's row shades the keys before it, darkest on the top key
        chosen = min(3, n_gen - 1)
        gen.nth(chosen).click()
        pos = n_prompt + chosen
        colours = backgrounds(page)
        shaded = [i for i, c in enumerate(colours) if c not in (TRANSPARENT, "rgb(255, 255, 255)")]
        assert shaded and max(shaded) < pos  # keys 0..pos-1 only
        top_key = int(page.inner_text("#attention-panel tr:nth-child(2) td:first-child"))
        assert brightness(colours[top_key]) == min(brightness(colours[i]) for i in shaded)
        assert "sel" in tokens.nth(pos).get_attribute("class") and "query" in tokens.nth(pos - 1).get_attribute("class")
        assert "mean over 4 heads" in page.inner_text("#attention-panel")

        # its log-probability and the five alternatives asked for
        assert float(page.inner_text("#token-panel .logprob")) <= 0
        assert page.locator("#alternatives tr").count() == 1 + 5
        assert page.locator("#alternatives tr.chosen").count() <= 1

        # the head grid: 2 layers x 4 heads, each labelled, with the legend counting them
        cells = page.locator("#grid .cell[data-label]")
        assert cells.count() == 8
        counts = [int(n) for n in re.findall(r"\((\d+)\)", page.inner_text("#legend"))]
        assert sum(counts) == 8

        # another head, then a grid cell: the view follows without a new run
        before = backgrounds(page)
        page.select_option("#head", "1")
        assert "H1" in page.inner_text("#attention-panel") and backgrounds(page) != before
        page.click("#grid .cell[data-l='0'][data-h='2']")
        assert page.input_value("#layer") == "0" and page.input_value("#head") == "2"
        assert "L0 H2" in page.inner_text("#head-detail")

        screenshot(page, tmp_path, "live-page-tiny.png")
        assert tab.requested_paths()[:3] == ["/", "/v1/models", "/tokenize"]
        assert_same_origin(tab, live.url)


def test_api_key_typed_in_the_page_and_errors_shown(tiny_llm, tab):
    page = tab.page
    settings = ServerSettings(api_key=KEY, max_attention_values=50_000)
    with LiveServer(create_app(tiny_llm, settings)) as live:
        assert open_page(tab, live.url).status == 200  # the page itself needs no key
        page.wait_for_selector("#model:has-text('API key')")
        set_prompt(page, "hello there", mode="chat")
        assert generate(page) == "error"
        error = page.locator("#error")
        assert error.is_visible() and error.inner_text().startswith("401: invalid or missing API key")

        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model:has-text('tiny')")
        assert generate(page, max_tokens=6) == "done" and not error.is_visible()
        sent = [auth for url, auth in tab.requests if urlsplit(url).path in ("/generate", "/tokenize")]
        assert sent[-2:] == [f"Bearer {KEY}"] * 2

        # a request over the server's attention limit: its 400 message, in the page
        page.select_option("#rows", "full")
        assert generate(page, max_tokens=200) == "error"
        assert re.match(r"400: attention dump too large", error.inner_text())
        assert_same_origin(tab, live.url)


def test_chat_spans_are_chosen_among_the_prompt_tokens(tiny_llm, tab):
    """A chat prompt has no character offsets of its own: its spans are prompt tokens selected in the text."""
    page = tab.page
    with LiveServer(create_app(tiny_llm)) as live:
        open_page(tab, live.url)
        set_prompt(page, "who sat on the mat?", mode="chat")
        assert generate(page, max_tokens=4) == "done"
        page.evaluate("""() => {  // drag over prompt tokens 3..9, as a person would
            const toks = document.querySelectorAll('#text .tok'), r = document.createRange();
            r.setStart(toks[3].firstChild, 0); r.setEnd(toks[9].firstChild, 1);
            getSelection().removeAllRanges(); getSelection().addRange(r); }""")
        page.fill("#span-name", "question")
        page.click("#add-span")
        assert "tokens [3, 10)" in page.inner_text("#span-list")
        assert generate(page, max_tokens=4) == "done", page.inner_text("#error")
        assert page.locator("#text .tok.sp").count() == 7 and "question" in page.inner_text("#span-view")
        assert page.locator("#span-bars .sbar").count() == page.locator("#text .tok.gen").count()
        page.fill("#prompt", "another prompt")  # the positions no longer mean anything: the span goes
        assert page.inner_text("#span-list") == ""
        assert_same_origin(tab, live.url)


def test_tool_calls_stream_into_the_page(tool_llm, tab, tmp_path):
    """Tools on: the chat goes to /v1/chat/completions with the tools; each call is drawn as it streams, its
    arguments growing, then pretty-printed; the attention views say they do not apply; tools off: /generate."""
    page = tab.page
    with LiveServer(create_app(tool_llm, ServerSettings(api_key=KEY))) as live:
        open_page(tab, live.url)
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model:has-text('tiny')")
        set_prompt(page, "What time is it in Berlin?", mode="chat")
        turn_tools_on(page, [TIME_TOOL], tool_choice="required")
        page.uncheck("#parallel_tool_calls")
        page.evaluate("""() => {  // every text the call's arguments block shows, in order (each piece sets it)
            window.shownArguments = [];
            new MutationObserver(records => records.forEach(r => {
                if (r.target.matches('.tool-call pre.arguments'))
                    r.addedNodes.forEach(n => window.shownArguments.push(n.textContent));
            })).observe(document.getElementById('text'), {childList: true, subtree: true}); }""")
        with page.expect_request(lambda r: urlsplit(r.url).path == "/v1/chat/completions") as sent:
            state = generate(page, max_tokens=120)
        assert state == "done", page.inner_text("#error")
        body = sent.value.post_data_json
        assert body["tools"] == [TIME_TOOL] and body["tool_choice"] == "required"
        assert body["parallel_tool_calls"] is False and body["stream"] is True and "attention" not in body
        assert body["messages"] == [{"role": "user", "content": "What time is it in Berlin?"}]
        assert sent.value.headers["authorization"] == f"Bearer {KEY}"
        assert re.match(r"done: tool_calls, 1 call, \d+ tokens", page.inner_text("#status"))

        # one call, open, named after the declared function, its arguments JSON that the schema allows
        calls = page.locator("#text details.tool-call")
        assert calls.count() == 1
        call = calls.first
        assert call.get_attribute("data-name") == "get_time" and call.get_attribute("open") is not None
        assert call.get_attribute("data-id").startswith("call_") and call.get_attribute("data-complete") == "true"
        assert call.locator("summary .fn").inner_text() == "get_time"
        shown = call.locator("pre.arguments").inner_text()
        arguments = json.loads(shown)
        assert set(arguments) == {"zone"} and arguments["zone"] in ("UTC", "CET")
        assert shown == json.dumps(arguments, indent=2)  # pretty-printed once the stream ended
        # as it streamed: the raw arguments text grew piece by piece (one per token here), then was pretty-printed
        seen = page.evaluate("window.shownArguments")
        raw = seen[:-1]
        assert len(raw) > 3 and raw[-1] == json.dumps(arguments) and seen[-1] == shown
        assert all(len(b) > len(a) and b.startswith(a) for a, b in zip(raw, raw[1:]))
        assert page.inner_text("#text").startswith("What time is it in Berlin?")

        # no attention on that route: a note where it would show, an empty head grid
        assert "captures no attention" in page.inner_text("#token-panel")
        assert page.locator("#grid .cell").count() == 0 and "no attention" in page.inner_text("#head-detail")
        assert "/generate" not in tab.requested_paths() and "/tokenize" not in tab.requested_paths()
        screenshot(page, tmp_path, "live-page-tools.png")

        # tools off: the same prompt streams from /generate again, with attention
        page.uncheck("#use-tools")
        assert generate(page, max_tokens=4) == "done", page.inner_text("#error")
        assert page.locator("#text .tool-call").count() == 0 and page.locator("#text .tok.gen").count() >= 1
        assert page.locator("#grid .cell[data-label]").count() == 8 and "no attention" not in page.inner_text("#view")
        assert_same_origin(tab, live.url)


def test_tools_off_by_default_and_bad_tools_shown_without_sending(tiny_llm, tab):
    page = tab.page
    with LiveServer(create_app(tiny_llm)) as live:
        open_page(tab, live.url)
        # closed and off at first; the example is a valid list with get_weather
        assert page.get_attribute("#tools-box", "open") is None and not page.is_checked("#use-tools")
        assert page.inner_text("#tools-state") == "off"
        [example] = json.loads(page.input_value("#tools"))
        assert example["type"] == "function" and example["function"]["name"] == "get_weather"

        set_prompt(page, "hello", mode="chat")
        error = page.locator("#error")
        cases = [  # (the tools box, the start of the message)
            ('[{"type": "function", "function": {"name": "get_weather",}}]', "tools: not valid JSON"),
            (json.dumps(TIME_TOOL), "tools: not a JSON list"),
            ("[]", "tools: the list is empty"),
            ("   ", "tools: the box is empty"),
        ]
        for i, (tools, message) in enumerate(cases):
            if i == 0:
                turn_tools_on(page, tools)
                assert page.inner_text("#tools-state") == "on"
            else:
                page.fill("#tools", tools)
            page.click("#generate")
            expect_text = error.inner_text() if error.is_visible() else ""
            assert expect_text.startswith(message), (tools, expect_text)
            assert "invalid" in page.get_attribute("#tools", "class")
        page.fill("#tools", json.dumps([TIME_TOOL]))  # valid, but tools are for Chat
        assert "invalid" not in page.get_attribute("#tools", "class")
        set_prompt(page, "hello", mode="completion")
        page.click("#generate")
        assert error.inner_text().startswith("tools apply to Chat mode")
        assert tab.requested_paths() == ["/", "/v1/models"]  # nothing was sent
        assert page.get_attribute("body", "data-state") == "ready"

        # what only the server can tell: its 400, naming the field, shown as the page shows errors
        set_prompt(page, "hello", mode="chat")
        page.fill("#tools", json.dumps([{"type": "function", "function": {"name": "bad name"}}]))
        assert generate(page) == "error"
        assert re.match(r"400: invalid value for 'tools\[0\]\.function\.name'", error.inner_text())
        assert page.locator("#text .tool-call").count() == 0
        assert_same_origin(tab, live.url)


def test_attn_report_in_the_browser(tiny_model, tab, tmp_path):
    """The `kvmini attn` report: no request leaves the file, the script draws, a grid cell opens its head."""
    from engine.inspect.cli import main

    report = tmp_path / "report.html"
    assert main(["attn", "--model", str(tiny_model), "--prompt", PROMPT, "--max-tokens", "4",
                 "--span", "doc1:0:19", "--out", str(report)]) == 0
    page = tab.page
    page.goto(report.as_uri())
    page.wait_for_selector("body[data-rendered='1']")
    page.click("#grid .cell[data-l='1'][data-h='2']")
    assert page.inner_text("#head-title").startswith("Head L1 H2")
    assert page.locator("#span-step tr[data-bucket='doc1']").count() == 1
    screenshot(page, tmp_path, "attn-report-tiny.png")
    assert [url for url, _ in tab.requests if url != report.as_uri()] == [] and not tab.errors


@pytest.mark.real
@pytest.mark.slow
def test_live_page_on_the_default_model(smollm2_dir, tab, tmp_path):
    """SmolLM2-135M-Instruct: 30 layers x 9 heads, two documents as spans; the README's screenshot."""
    docs = ["Doc 1: The Eiffel Tower is in Paris.", "Doc 2: Bananas are yellow."]
    prompt = f"Answer from the documents.\n{docs[0]}\n{docs[1]}\nQ: Where is the Eiffel Tower?\nA:"
    page = tab.page
    llm = LLM(smollm2_dir, dtype="float32", kv_cache_memory=64 << 20)  # its own: a server drives its engine
    with LiveServer(create_app(llm)) as live:
        open_page(tab, live.url)
        set_prompt(page, prompt)
        for i, doc in enumerate(docs):
            add_span(page, f"doc{i + 1}", prompt.index(doc), prompt.index(doc) + len(doc))
        assert generate(page, max_tokens=10, timeout_s=120) == "done", page.inner_text("#error")
        assert page.locator("#grid .cell[data-label]").count() == 30 * 9
        gen = page.locator("#text .tok.gen")
        texts = [gen.nth(i).inner_text() for i in range(gen.count())]
        assert " Paris" in texts and page.locator("#span-bars .sbar").count() == len(texts)
        # L17 H4, an induction/copying head (README): producing " Paris", it looks at " Paris" in doc 1
        page.click("#grid .cell[data-l='17'][data-h='4']")
        gen.nth(texts.index(" Paris")).click()
        assert page.inner_text("#attention-panel tr:nth-child(2) td.mono") == "\u00ab Paris\u00bb"
        screenshot(page, tmp_path, "live-page.png")
        assert_same_origin(tab, live.url)
