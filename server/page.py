"""`GET /`: the live page, one self-contained HTML file (server/static/live.html; inline CSS and script).

The page is a client of this server's own API and holds no data, so it is open like `/health`
(server/middleware.py OPEN_PATHS): the requests it makes carry the API key the person types. It reads
/v1/models and /tokenize (the prompt's tokens and their texts), then streams POST /generate with `logprobs` and
`attention` (every layer and head, full rows or top-k, spans, head statistics) and draws what arrives; with
tools on, it streams POST /v1/chat/completions instead and draws each tool call as it streams.

Its Content-Security-Policy lets the page talk to this origin only and run only its own inline script (by
its hash), so nothing external can load and text that reached the page as markup could not run. The label
colours and abbreviations are the `kvmini attn` report's (engine/inspect/report.py), filled in once here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from engine.capture.head_stats import LABELS
from engine.inspect.report import (
    ABBREV,
    GENERATED_COLOUR,
    LABEL_COLOURS,
    LABEL_HELP,
    RAMP_END,
    REST_COLOUR,
    SPAN_PALETTE,
)

PAGE_FILE = ("static", "live.html")
VOCABULARY_MARK = "__VOCABULARY__"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)  # the JSON block has a type, so is not run


def vocabulary() -> dict:
    """What the page shares with the report: label names, colours, abbreviations, help, span colours."""
    return {"labels": list(LABELS), "colours": LABEL_COLOURS, "abbrev": ABBREV, "help": LABEL_HELP,
            "spanPalette": list(SPAN_PALETTE), "generatedColour": GENERATED_COLOUR, "restColour": REST_COLOUR,
            "rampEnd": list(RAMP_END)}


def render_page() -> str:
    template = files("server").joinpath(*PAGE_FILE).read_text(encoding="utf-8")
    data = json.dumps(vocabulary(), separators=(",", ":")).replace("<", "\\u003c")  # never ends the block
    return template.replace(VOCABULARY_MARK, data)


def content_security_policy(page: str) -> str:
    """This origin only; the page's own inline scripts by hash; inline styles (the heatmap sets them)."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in INLINE_SCRIPT.findall(page))
    return "; ".join([
        "default-src 'none'", f"script-src {hashes}", "style-src 'unsafe-inline'", "connect-src 'self'",
        "img-src data:", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])


def install_page(app: FastAPI) -> None:
    """Serve the page at `/` (left out of /openapi.json: it is not part of the API)."""
    page = render_page()
    headers = {"Content-Security-Policy": content_security_policy(page), "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def live_page() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)
