"""The chat page at `/`: one self-contained HTML file shipped in the package (no build step, nothing fetched from
elsewhere), talking to the same server's /v1 API.

Everything the page needs is inline in services/static/index.html, so it also works under a route prefix (`/tight`
or `/tight/`: the page derives the API base from its own path, and there are no asset URLs to resolve).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "index.html"

# Inline script and style only; requests only to this server; no framing, no form posts elsewhere. The API key the
# page holds can only ever be sent back here.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def chat_page_html() -> str:
    """The page as shipped in the installed package."""
    return resources.files("services").joinpath("static", PAGE).read_text(encoding="utf-8")


async def chat_page() -> HTMLResponse:
    return HTMLResponse(chat_page_html(), headers=PAGE_HEADERS)


def add_chat_page(app: FastAPI) -> None:
    """Serve the chat page at GET / of `app`. With Serve, call it before `@serve.ingress(app)`, which freezes the
    app's routes."""
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
