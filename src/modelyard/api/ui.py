"""The web dashboard's routes: `GET /ui` (the page) and `GET /ui/{asset}` (its ES modules and stylesheet),
served from the files shipped inside the package (modelyard/ui/), so the dashboard works offline and needs no
build step.

The assets need no API key (api/auth.py's ROUTE_SCOPES leaves /ui open, as router mode exempts its web UI):
they hold no data. Every data call the page makes carries the key itself. Each answer has a strict
Content-Security-Policy (scripts, styles and connections from this origin only, no inline script, no framing),
so a model name or a log line shown by the page can never run as code, and `nosniff`, so no asset is read as
another type than the one sent.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

from modelyard.api.errors import error_response
from modelyard.errors import ErrorKind

PATH = "/ui"
_PACKAGE = "modelyard.ui"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
          ".svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # the assets are small and change with the installed version: revalidate rather than show a stale page
    "Cache-Control": "no-cache",
}


@cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file of the package, by name, read once: only these names are ever answered, so no
    request path reaches the file system."""
    assets = {}
    for entry in resources.files(_PACKAGE).iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            assets[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return assets


def _answer(name: str) -> web.Response:
    found = _assets().get(name)
    if found is None:
        return error_response(ErrorKind.NOT_FOUND, f"the dashboard has no file {name!r}")
    body, content_type = found
    charset = None if content_type.startswith("image/") and content_type != "image/svg+xml" else "utf-8"
    return web.Response(body=body, content_type=content_type, charset=charset, headers=_HEADERS)


async def page(request: web.Request) -> web.Response:
    return _answer("index.html")


async def asset(request: web.Request) -> web.Response:
    return _answer(request.match_info["name"])


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, page)
    app.router.add_get(PATH + "/{name}", asset)
