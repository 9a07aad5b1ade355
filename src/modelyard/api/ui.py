"""The browser pages: the dashboard (`GET /ui`, `GET /ui/{asset}`), and llama.cpp's own web UI at `/`.

The dashboard is served from the files shipped inside the package (modelyard/ui/), so it works offline and
needs no build step. Each answer has a strict Content-Security-Policy (scripts, styles and connections from this
origin only, no inline script, no framing), so a model name or a log line shown by the page can never run as
code, and `nosniff`, so no asset is read as another type than the one sent.

llama.cpp's web UI (engine/webui.py builds it; `--path DIR` serves another, `--no-webui` none) is served as
llama-server router mode serves its embedded copy: `/` (for a browser, which asks for HTML; Ollama's clients
keep their "Ollama is running") and `/index.html` with an ETag, `no-cache` and the cross-origin isolation
headers, the hashed files cached for ever, the service worker, manifest and version files revalidated, gzip
for the browsers that accept it, router mode's content types. One route per file of the build, as router mode
registers one per embedded asset, so no request path reaches the file system. Without a UI, `/` redirects
browsers to the dashboard and `/sw.js` answers router mode's self-removing worker, so a browser that once ran
the UI stops showing its cached copy.

None of these pages needs an API key (api/auth.py leaves /ui and / open, and `PUBLIC` lists the UI's files, as
router mode exempts its UI): they hold no data. Every data call a page makes carries the key itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import PurePosixPath

from aiohttp import web
from aiohttp.typedefs import Handler

from modelyard.api.context import CONTEXT, SETTINGS
from modelyard.api.errors import error_response
from modelyard.engine.webui import WebUi, compressible
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

# --- the dashboard ------------------------------------------------------------------------------------------


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
    """The page names its stylesheet and script by absolute path; under --api-prefix (api/app.py) they carry it
    (the scripts take theirs from their own URL: ui/api.js)."""
    response = _answer("index.html")
    prefix = request.app[SETTINGS].api_prefix  # a node's app and the cluster's front both have the settings
    if prefix and isinstance(response.body, bytes):
        response.body = response.body.replace(b'="/ui/', f'="{prefix}/ui/'.encode())
    return response


async def asset(request: web.Request) -> web.Response:
    return _answer(request.match_info["name"])


# --- llama.cpp's web UI at / --------------------------------------------------------------------------------

# llama.cpp's scripts/ui-assets.cmake: the types router mode sends for its embedded assets
_UI_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "application/javascript",
             ".json": "application/json", ".webmanifest": "application/manifest+json", ".svg": "image/svg+xml",
             ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".ico": "image/x-icon",
             ".woff": "font/woff", ".woff2": "font/woff2"}
# server-http.cpp: the files a new build changes under the same name are revalidated; the rest carry a hash
_UI_NO_CACHE = frozenset({"sw.js", "manifest.webmanifest", "_app/version.json", "build.json"})
_UI_IMMUTABLE = "public, max-age=31536000, immutable"
# server-http.cpp: the page is cross-origin isolated (its workers and wasm need it)
_UI_ISOLATION = {"Cross-Origin-Embedder-Policy": "require-corp", "Cross-Origin-Opener-Policy": "same-origin"}
INDEX = "index.html"
SERVICE_WORKER = "sw.js"
# server-http.cpp: what router mode answers a browser's update check when it serves no UI of its own
SERVICE_WORKER_REMOVER = """
self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil((async () => {
    await self.registration.unregister();
    for (const key of await caches.keys()) await caches.delete(key);
    for (const c of await self.clients.matchAll({ type: 'window' })) c.navigate(c.url);
})()));
"""
PUBLIC = web.AppKey("webui_public_paths", frozenset[str])  # the UI's paths, open without a key


def ui_headers(name: str, built: bool) -> dict[str, str]:
    """The headers of one UI file. modelyard's build gets router mode's embedded-asset policy; a `--path`
    directory gets no caching policy, as router mode's static mount sends none (a file there may change under
    the same name). Validators (ETag, Last-Modified) and Content-Encoding come with the file."""
    headers = {"Content-Type": _UI_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream"),
               "X-Content-Type-Options": "nosniff"}
    if not built:
        return headers
    if name == INDEX:
        return {**headers, "Cache-Control": "no-cache", **_UI_ISOLATION}
    return {**headers, "Cache-Control": "no-cache" if name in _UI_NO_CACHE else _UI_IMMUTABLE}


def public_paths(names: Iterable[str]) -> frozenset[str]:
    """The paths of the UI's files (`/` and `/sw.js` are open in api/auth.py's table, with or without a UI)."""
    return frozenset("/" + name for name in names)


def _ui_file(webui: WebUi, name: str) -> web.StreamResponse:
    path = webui.root / name
    if not path.is_file():  # the cache was cleared under a running server
        return error_response(ErrorKind.NOT_FOUND, f"the web UI's file {name!r} is gone from {webui.root}; "
                                                   f"run `modelyard engine install` and restart modelyard")
    # FileResponse answers If-None-Match (304), ranges and HEAD, and sends the `.gz` sibling to a browser
    # that accepts gzip (router mode answers one that does not with 415; this one gets the plain file)
    headers = ui_headers(name, webui.built)
    if webui.built and compressible(name):  # a cache must keep the gzip and the plain answer apart
        headers["Vary"] = "Accept-Encoding"
    return web.FileResponse(path, headers=headers)


def browser_root(request: web.Request) -> web.StreamResponse:
    """`GET /` from a browser: llama.cpp's web UI, or the dashboard when there is none."""
    webui = request.app[SETTINGS].webui
    if webui is None or INDEX not in webui.names:
        raise web.HTTPFound(PATH)
    return _ui_file(webui, INDEX)


def _serve(webui: WebUi, name: str) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return _ui_file(webui, name)

    return answer


async def _remove_service_worker(request: web.Request) -> web.Response:
    return web.Response(text=SERVICE_WORKER_REMOVER, content_type="application/javascript",
                        headers={"Cache-Control": "no-cache"})


def add_webui_routes(app: web.Application, webui: WebUi | None) -> None:
    """One route per file; a name that an API route already has (possible with `--path`) stays the API's."""
    taken = {resource.canonical for resource in app.router.resources()}
    routed = []
    if webui is not None:
        for name in webui.names:
            if "/" + name not in taken and not {"{", "}"} & set(name):  # braces would make it a pattern
                app.router.add_get("/" + name, _serve(webui, name))
                routed.append(name)
    if SERVICE_WORKER not in routed:
        app.router.add_get("/" + SERVICE_WORKER, _remove_service_worker)
    app[PUBLIC] = public_paths(routed)


def add_dashboard_routes(app: web.Application) -> None:
    """The dashboard's page and files (they read only the settings: the cluster's front serves them too)."""
    app.router.add_get(PATH, page)
    app.router.add_get(PATH + "/{name}", asset)


def add_routes(app: web.Application) -> None:
    add_dashboard_routes(app)
    add_webui_routes(app, app[CONTEXT].settings.webui)
