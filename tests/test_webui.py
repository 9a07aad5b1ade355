"""llama.cpp's own web UI at `/`: its build by `engine install` (engine/webui.py) with a fake npm (the pure checks,
the publish, the one-line reasons for no npm and a failed build), its serving with router mode's headers
in-process over such a build (api/ui.py), and the real build (`modelyard engine install`, npm) in headless
Chromium against modelyard and against llama-server router mode (the same binary, serving the same files with
`--path`): the UI lists the models, selects one, which loads it, streams a chat reply, and unloads it.

The browser tests skip only when the UI was never built on this machine; a build that failed fails them, with
its reason. Screenshots go to tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from playwright.sync_api import Browser, Page, Route, expect

from modelyard import cli
from modelyard.api.auth import ApiKey
from modelyard.api.context import ServerSettings
from modelyard.api.ui import SERVICE_WORKER_REMOVER, ui_headers
from modelyard.bench.processes import ROUTER_MODE, RouterProcess, start_router
from modelyard.config.options import OptionTable
from modelyard.engine import webui, webui_patch
from modelyard.engine.command import Engine
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from tests.conftest import Router
from tests.fakes import FakeClock, FakeFleet, StaticSource, app_client, catalog
from tests.test_dashboard import ARTIFACTS, LOAD_TIMEOUT_MS, browser  # noqa: F401  (the shared Chromium)

HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # what a browser asks for
BUNDLE = "_app/immutable/bundle.Ab12Cd.js"

# --- the pure checks of a build -----------------------------------------------------------------------------

COMPLETE = ["index.html", "manifest.webmanifest", "sw.js", "build.json", "_app/version.json", BUNDLE,
            "_app/immutable/assets/bundle.Ef34.css", "workbox-b3c04f83.js", "favicon.svg"]


@pytest.mark.parametrize(("names", "missing"), [
    (COMPLETE, []),
    ([n for n in COMPLETE if n != "sw.js"], ["sw.js"]),
    ([n for n in COMPLETE if not n.endswith(".css")], ["bundle[hash].css"]),
    ([n for n in COMPLETE if "workbox" not in n], ["workbox[hash].js"]),
    ([], ["index.html", "manifest.webmanifest", "sw.js", "build.json", "_app/version.json", "bundle[hash].js",
          "bundle[hash].css", "workbox[hash].js"]),
])
def test_a_build_must_have_what_the_ui_needs_at_run_time(names: list[str], missing: list[str]) -> None:
    assert webui.missing_assets(names) == missing


@pytest.mark.parametrize(("text", "found"), [
    ('<script src="./_app/immutable/bundle.js"></script><link href="favicon.svg">', []),
    ('<svg xmlns="http://www.w3.org/2000/svg"></svg>', []),  # a namespace, not a load
    ('<script src="https://cdn.example.com/x.js"></script>', ["https://cdn.example.com/x.js"]),
    ("<link rel=stylesheet href=//fonts.example.com/css>", ["//fonts.example.com/css"]),
    ("@font-face{src:url( 'https://fonts.example.com/a.woff2' )}", ["https://fonts.example.com/a.woff2"]),
    ("a{background:url(data:image/svg+xml,%3csvg xmlns='http://www.w3.org/2000/svg')}", []),
])
def test_references_that_would_reach_the_network_are_found(text: str, found: list[str]) -> None:
    assert webui.external_references(text) == found


@pytest.mark.parametrize(("output", "gist"), [
    ("npm warn deprecated x\nnpm error code E404\nnpm error 404 Not Found - GET https://registry/x\nnpm error x",
     "code E404; 404 Not Found - GET https://registry/x"),
    ("vite v7\nerror during build:\nRollupError: boom\n", "RollupError: boom"),
    ("", "no output"),
])
def test_a_failed_npm_step_is_told_by_its_first_error_lines(output: str, gist: str) -> None:
    assert webui.npm_error(output) == gist


BUILT, NONE = Path("/cache/llama-ui"), None


@pytest.mark.parametrize(("settings", "environ", "installed", "failure", "root", "built", "note"), [
    ({}, {}, BUILT, None, BUILT, True, "web UI at /: llama.cpp's"),
    ({"--webui": "false"}, {}, BUILT, None, None, False, "disabled (--no-webui)"),
    ({}, {"LLAMA_ARG_UI": "0"}, BUILT, None, None, False, "disabled"),
    ({"--webui": "true"}, {"LLAMA_ARG_UI": "0"}, BUILT, None, BUILT, True, "llama.cpp's"),  # the flag wins
    ({"--path": "/srv/ui"}, {}, BUILT, None, Path("/srv/ui"), False, "static files from --path /srv/ui"),
    ({}, {"LLAMA_ARG_STATIC_PATH": "/srv/ui"}, NONE, None, Path("/srv/ui"), False, "--path"),
    ({}, {}, NONE, None, None, False, "not built (`modelyard engine install` builds it with npm)"),
    ({}, {}, NONE, "`npm ci` failed", None, False, "its build failed: `npm ci` failed"),
])
def test_serve_chooses_the_ui_with_router_modes_flags(settings: dict[str, str], environ: dict[str, str],
                                                      installed: Path | None, failure: str | None,
                                                      root: Path | None, built: bool, note: str) -> None:
    choice = webui.choose(settings, environ, installed, failure)
    assert (choice.root, choice.built) == (root, built)
    assert note in choice.note


IMMUTABLE = "public, max-age=31536000, immutable"


@pytest.mark.parametrize(("name", "built", "content_type", "cache_control", "isolated"), [
    ("index.html", True, "text/html; charset=utf-8", "no-cache", True),
    (BUNDLE, True, "application/javascript", IMMUTABLE, False),
    ("_app/immutable/assets/bundle.Ef34.css", True, "text/css", IMMUTABLE, False),
    ("favicon.ico", True, "image/x-icon", IMMUTABLE, False),
    ("sw.js", True, "application/javascript", "no-cache", False),
    ("manifest.webmanifest", True, "application/manifest+json", "no-cache", False),
    ("_app/version.json", True, "application/json", "no-cache", False),
    ("build.json", True, "application/json", "no-cache", False),
    ("data.bin", True, "application/octet-stream", IMMUTABLE, False),
    ("index.html", False, "text/html; charset=utf-8", None, False),  # --path: router mode's mount sends none
    ("app.js", False, "application/javascript", None, False),
])
def test_ui_files_get_router_modes_headers(name: str, built: bool, content_type: str, cache_control: str | None,
                                           isolated: bool) -> None:
    headers = ui_headers(name, built)
    assert headers["Content-Type"] == content_type and headers["X-Content-Type-Options"] == "nosniff"
    assert headers.get("Cache-Control") == cache_control
    assert ("Cross-Origin-Embedder-Policy" in headers) == ("Cross-Origin-Opener-Policy" in headers) == isolated


# --- the build, with a fake npm -----------------------------------------------------------------------------

FAKE_NPM = """#!/bin/sh
# npm as tools/ui uses it: `ci`, then `run build` writing the UI to $LLAMA_UI_OUT_DIR; FAKE_NPM says how to fail
echo "$@" >> "$FAKE_NPM_CALLS"
if [ "$1" = ci ]; then
  if [ "$FAKE_NPM" = ci-fails ]; then echo "npm error code ENOTFOUND"; echo "npm error network down"; exit 1; fi
  echo "added 1060 packages"; exit 0
fi
out="$LLAMA_UI_OUT_DIR"
mkdir -p "$out/_app/immutable/assets"
script='<script src="./_app/immutable/bundle.Ab12Cd.js"></script>'
if [ "$FAKE_NPM" = cdn ]; then script='<script src="https://cdn.example.com/ui.js"></script>'; fi
printf '<!doctype html><html><head>%s</head><body>llama ui %s</body></html>' "$script" "$LLAMA_BUILD_NUMBER" \
  > "$out/index.html"
printf 'console.log("%s")' "$(seq 1 2000)" > "$out/_app/immutable/bundle.Ab12Cd.js"
printf 'body{color:red}' > "$out/_app/immutable/assets/bundle.Ef34.css"
printf '{"version":"1"}' > "$out/_app/version.json"
printf '{"version":"%s"}' "$LLAMA_BUILD_NUMBER" > "$out/build.json"
printf '{"name":"llama-ui"}' > "$out/manifest.webmanifest"
printf 'self.addEventListener("install", () => 0)' > "$out/sw.js"
printf 'define([], () => 0)' > "$out/workbox-b3c04f83.js"
printf '\\211PNG fake' > "$out/pwa-64x64.png"
echo "Wrote site to $out"
"""


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(npm, tools/ui source) with the engine cache in tmp_path; the npm's calls are logged to `calls`."""
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text(FAKE_NPM)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    source = tmp_path / "tools-ui"
    _write_ui_source(source)
    monkeypatch.setenv("MODELYARD_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_NPM_CALLS", str(tmp_path / "calls"))
    monkeypatch.delenv("FAKE_NPM", raising=False)
    yield str(npm), source


# What modelyard's patches change in tools/ui's source (engine/webui_patch.py), as b11434 has it
STATUS_SOURCE = """\
\tprivate applyModelStatus(event: ApiModelsSseEvent): void {
\t\tconst status = data.status;

\t\tthis.setRouterModelStatus(model, status);
\t}
"""
MODELS_SOURCE = """\
\tasync fetchRouterModels(): Promise<void> {
\t\ttry {
\t\t\tconst response = await ModelsService.list();

\t\t\tthis.routerModels = response.data;
\t\t}
\t}
\tprivate async runFetch(): Promise<void> {
\t\t\tif (router) {
\t\t\t\tconst response = await ModelsService.list();

\t\t\t\tthis.routerModels = response.data;
\t\t\t}
\t}
"""


def _write_ui_source(source: Path, models: str = MODELS_SOURCE) -> None:
    for patch, text in ((webui_patch.PATCHES[0], STATUS_SOURCE), (webui_patch.PATCHES[2], models)):
        (source / patch.path).parent.mkdir(parents=True, exist_ok=True)
        (source / patch.path).write_text(text)


def test_the_patches_keep_the_feeds_newer_statuses_over_a_stale_list(tmp_path: Path) -> None:
    _write_ui_source(tmp_path)
    webui_patch.apply_all(tmp_path)
    status = (tmp_path / webui_patch.PATCHES[0].path).read_text()
    assert status.index("withNewerStatuses(rows") < status.index("private applyModelStatus")
    assert ("\t\tthis.feedStatuses.set(model, { status, version: ++this.statusVersion });\n"
            "\t\tthis.setRouterModelStatus(model, status);") in status
    models = (tmp_path / webui_patch.PATCHES[2].path).read_text()
    for tabs in ("\t\t\t", "\t\t\t\t"):  # both places that take a list's rows, at their own indentation
        assert (f"\n{tabs}const since = this._status.statusVersion;\n{tabs}const response = await "
                f"ModelsService.list();\n\n{tabs}this.routerModels = this._status.withNewerStatuses(response.data, "
                f"since);\n") in models
    assert "= response.data;" not in models


@pytest.mark.parametrize(("models", "reason"), [
    (MODELS_SOURCE.replace("this.routerModels = response.data;", "this.rows = response.data;", 1),
     "'list-keeps-newer-statuses' no longer applies to src/lib/stores/models/index.svelte.ts (matched 1 times, "
     "expected 2): the llama.cpp UI source changed"),
    (None, "'list-keeps-newer-statuses': src/lib/stores/models/index.svelte.ts is not in the llama.cpp UI source "
           "(No such file or directory)"),
])
def test_a_source_the_patches_no_longer_fit_fails_the_build_and_says_which(
        fake_npm: tuple[str, Path], tmp_path: Path, models: str | None, reason: str) -> None:
    npm, source = fake_npm
    if models is None:
        (source / webui_patch.PATCHES[2].path).unlink()
    else:
        _write_ui_source(source, models)
    outcome = webui.install_ui(lambda line: None, source=source, npm=npm)
    assert outcome.path is None and _calls(tmp_path) == []  # nothing built without the fix
    assert webui.recorded_failure() == f"modelyard's web UI patch {reason}"


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_install_builds_publishes_gzips_and_then_reuses(fake_npm: tuple[str, Path], tmp_path: Path) -> None:
    npm, source = fake_npm
    lines: list[str] = []
    stages: list[str] = []
    outcome = webui.install_ui(lines.append, progress=lambda stage, done: stages.append(stage), source=source,
                               npm=npm)
    assert outcome.path == webui.ui_dir() == webui.installed_ui()
    assert outcome.message == lines[-1] and outcome.message.startswith("llama.cpp web UI installed: ")
    assert stages == ["ui-install", "ui-build", "ui-done"] and _calls(tmp_path) == ["ci", "run build"]
    built = webui.ui_dir()
    assert "llama ui 11434" in (built / "index.html").read_text()  # the build number, as llama.cpp's cmake sets
    assert (built / f"{BUNDLE}.gz").is_file() and not (built / "pwa-64x64.png.gz").exists()  # text only
    assert webui.asset_names(built) == sorted([*COMPLETE[:-1], "pwa-64x64.png"])  # the .gz files are no assets
    assert not list(built.parent.glob("*.partial")) and not list(built.parent.glob("*.staging"))

    again = webui.install_ui(lines.append, source=source, npm=npm)
    assert again.path == built and "already built" in again.message and _calls(tmp_path) == ["ci", "run build"]
    forced = webui.install_ui(lines.append, force=True, source=source, npm=npm)
    assert forced.path == built and len(_calls(tmp_path)) == 4


def test_without_npm_there_is_no_ui_and_engine_install_says_why_in_one_line(
        fake_npm: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "install_engine", lambda echo, force, progress: echo("llama-server already built"))
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli.main, ["engine", "install"], env={"PATH": str(tmp_path / "empty")})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        "llama.cpp web UI not built: npm not found (install Node.js 20.19+ with npm, then run `modelyard engine "
        "install` again); / redirects browsers to the dashboard at /ui")
    assert webui.installed_ui() is None and webui.recorded_failure() is None  # nothing to retry: not recorded


@pytest.mark.parametrize(("mode", "reason"), [
    ("ci-fails", "`npm ci` failed with exit code 1: code ENOTFOUND; network down"),
    ("cdn", "index.html loads from the network (https://cdn.example.com/ui.js): it would not work offline"),
])
def test_a_failed_build_is_said_recorded_and_retried_only_when_asked(
        fake_npm: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, reason: str) -> None:
    npm, source = fake_npm
    monkeypatch.setenv("FAKE_NPM", mode)
    lines: list[str] = []
    outcome = webui.install_ui(lines.append, source=source, npm=npm)
    assert outcome.path is None and webui.installed_ui() is None
    assert outcome.message.startswith(f"llama.cpp web UI not built: {reason} (log: ")
    assert outcome.message.endswith("/ redirects browsers to the dashboard at /ui")
    assert webui.recorded_failure() == reason
    assert not list(webui.ui_dir().parent.glob("*.partial"))
    calls = len(_calls(tmp_path))

    later = webui.install_ui(lines.append, source=source, npm=npm)  # `make setup` again: not the slow failure
    assert len(_calls(tmp_path)) == calls and "`modelyard engine install --retry-ui` tries again" in later.message
    monkeypatch.delenv("FAKE_NPM")
    retried = webui.install_ui(lines.append, retry=True, source=source, npm=npm)
    assert retried.path == webui.ui_dir() and webui.recorded_failure() is None


# --- serving, in-process over a fake build ------------------------------------------------------------------


@pytest.fixture
def fake_build(fake_npm: tuple[str, Path]) -> webui.WebUi:
    npm, source = fake_npm
    path = webui.install_ui(lambda line: None, source=source, npm=npm).path
    assert path is not None
    loaded = webui.load(webui.UiChoice(path, True, ""))
    assert loaded is not None
    return loaded


async def _client(tmp_path: Path, settings: ServerSettings) -> Any:
    source = StaticSource(catalog("smol"))
    manager = ModelManager(source, Engine(Path("/nonexistent/llama-server"), OptionTable([])),
                           catalog=source.value, clock=FakeClock(), gguf_cache=GgufCache(tmp_path),
                           child_factory=FakeFleet(FakeClock()))
    return await app_client(manager, settings)


async def test_browsers_get_the_ui_at_root_with_router_modes_headers_and_no_key(
        fake_build: webui.WebUi, tmp_path: Path) -> None:
    client = await _client(tmp_path, ServerSettings(webui=fake_build, api_keys=(ApiKey("k"),)))
    try:
        page = await client.get("/", headers={"Accept": HTML, "Accept-Encoding": "gzip, deflate, br"})
        assert page.status == 200 and "llama ui" in await page.text()  # no key: the page holds no data
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Content-Encoding"] == "gzip" and page.headers["Vary"] == "Accept-Encoding"
        assert page.headers["Cache-Control"] == "no-cache" and page.headers["Cross-Origin-Embedder-Policy"]
        assert "Content-Security-Policy" not in page.headers  # router mode sends none; its page runs inline code
        again = await client.get("/", headers={"Accept": HTML, "Accept-Encoding": "gzip",
                                               "If-None-Match": page.headers["ETag"]})
        assert again.status == 304  # revalidated, not sent again
        plain = await client.get("/index.html", headers={"Accept-Encoding": "identity"})
        assert plain.status == 200 and "Content-Encoding" not in plain.headers  # router mode: 415
        assert plain.headers["Cross-Origin-Opener-Policy"] == "same-origin"

        bundle = await client.get("/" + BUNDLE)
        assert bundle.status == 200 and bundle.headers["Cache-Control"] == IMMUTABLE
        assert bundle.headers["Content-Type"] == "application/javascript"
        worker = await client.get("/sw.js")
        assert worker.headers["Cache-Control"] == "no-cache" and "install" in await worker.text()
        head = await client.head("/pwa-64x64.png")
        assert head.status == 200 and head.headers["Content-Type"] == "image/png"

        assert (await client.get("/")).status == 200 and await (await client.get("/")).text() == "Ollama is running"
        missing = await client.get("/_app/immutable/nope.js", headers={"Authorization": "Bearer k"})
        assert missing.status == 404 and "unknown endpoint" in (await missing.json())["error"]["message"]
        assert (await client.get("/_app/immutable/nope.js")).status == 401  # not a UI file: keyed as before
        assert (await client.get("/models")).status == 401  # the data calls need the key
        assert (await client.post("/index.html")).status == 401  # only GET is open

        (fake_build.root / "build.json").unlink()  # the cache cleared under a running server
        gone = await client.get("/build.json")
        assert gone.status == 404 and "run `modelyard engine install`" in (await gone.json())["error"]["message"]
    finally:
        await client.close()


async def test_without_a_ui_browsers_go_to_the_dashboard_and_a_cached_worker_removes_itself(
        tmp_path: Path) -> None:
    client = await _client(tmp_path, ServerSettings())
    try:
        redirect = await client.get("/", headers={"Accept": HTML}, allow_redirects=False)
        assert (redirect.status, redirect.headers["Location"]) == (302, "/ui")
        worker = await client.get("/sw.js")
        assert worker.status == 200 and await worker.text() == SERVICE_WORKER_REMOVER
        assert worker.headers["Content-Type"].startswith("application/javascript")
        assert (await client.get("/index.html")).status == 404
    finally:
        await client.close()


async def test_a_path_directory_is_served_as_router_modes_static_mount(tmp_path: Path) -> None:
    static = tmp_path / "static"
    (static / "js").mkdir(parents=True)
    (static / "index.html").write_text("<p>my own ui</p>")
    (static / "js" / "app.js").write_text("console.log(1)")
    (static / "health").write_text("a file named like an API route")
    served = webui.load(webui.choose({"--path": str(static)}, {}, None, None))
    client = await _client(tmp_path, ServerSettings(webui=served))
    try:
        page = await client.get("/", headers={"Accept": HTML})
        assert await page.text() == "<p>my own ui</p>"
        assert "Cache-Control" not in page.headers and page.headers["ETag"] and page.headers["Last-Modified"]
        assert (await client.get("/js/app.js")).headers["Content-Type"] == "application/javascript"
        assert (await client.get("/health")).headers["Content-Type"].startswith("application/json")  # the API's
        assert await (await client.get("/sw.js")).text() == SERVICE_WORKER_REMOVER  # it has no worker of its own
    finally:
        await client.close()
    with pytest.raises(ValueError, match="not a directory"):
        webui.load(webui.choose({"--path": str(tmp_path / "nope")}, {}, None, None))


# --- the real build, in Chromium, against modelyard and router mode -----------------------------------------


@pytest.fixture(scope="module")
def built_ui() -> Path:
    path = webui.installed_ui()
    if path is None:
        failure = webui.recorded_failure()
        if failure:
            pytest.fail(f"llama.cpp's web UI failed to build: {failure}")
        pytest.skip("llama.cpp's web UI is not built on this machine (`modelyard engine install` builds it when "
                    "npm is present)")
    return path


def test_the_built_ui_is_complete_and_loads_nothing_from_the_network(built_ui: Path) -> None:
    names = webui.asset_names(built_ui)
    assert webui.missing_assets(names) == []
    for name in names:
        if name.endswith((".html", ".css")):
            assert webui.external_references((built_ui / name).read_text()) == [], name
    assert json.loads((built_ui / "build.json").read_text()) == {"version": "11434"}


@pytest.fixture(scope="module")
def routers(built_ui: Path, module_models_dir: Path, llama_server: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Both routers over the same models (smol, smol-b, gemma), started at once; `-n 24` bounds the replies."""
    work = tmp_path_factory.mktemp("webui")
    engine_args = ["-c", "2048", "-n", "24"]
    modelyard = Router(["--models-dir", str(module_models_dir), *engine_args], work)
    router_mode: RouterProcess | None = None
    try:
        router_mode = start_router(ROUTER_MODE, llama_server, ["--models-dir", str(module_models_dir)], 4, work,
                                   [*engine_args, "--path", str(built_ui)])
        modelyard.wait_ready()
        router_mode.wait_ready(30)
        yield {"modelyard": modelyard.url, "router mode": router_mode.url}
    finally:
        if router_mode is not None:
            router_mode.stop()
        modelyard.stop()


def test_every_file_of_the_ui_is_served_by_both(routers: dict[str, str], built_ui: Path) -> None:
    names = webui.asset_names(built_ui)
    for url in routers.values():
        with httpx.Client(base_url=url) as client:
            assert client.get("/", headers={"Accept": HTML}).text == (built_ui / "index.html").read_text()
            for name in names:
                answer = client.get("/" + name)
                assert answer.status_code == 200 and answer.content == (built_ui / name).read_bytes(), (url, name)


def _wait_status(url: str, model: str, wanted: str, timeout: float = 30) -> None:
    """The router's own listing (a page may show a status before the listing has it, or after)."""
    deadline = time.monotonic() + timeout
    while True:
        listing = httpx.get(f"{url}/models").json()["data"]
        status = next(str(entry["status"]["value"]) for entry in listing if entry["id"] == model)
        if status == wanted:
            return
        assert time.monotonic() < deadline, f"{model} is {status}, not {wanted}"
        time.sleep(0.05)


def _model_menu(page: Page) -> Any:
    """The chat form's model selector (the form's last menu button; the first adds files)."""
    return page.locator("form.conversation-chat-form button[aria-haspopup=menu]").last


def _open_menu(page: Page) -> None:
    """Open the model menu the first time: the UI ignores a click on it while its first model list is being
    fetched (handleOpenChange returns while modelsStore is loading), which on a busy machine can outlast the
    page's load event; the button says when the menu is open."""
    for _ in range(30):
        _model_menu(page).click()
        try:
            expect(_model_menu(page)).to_have_attribute("aria-expanded", "true", timeout=1000)
            return
        except AssertionError:
            continue
    raise AssertionError("the model menu never opened")


def _option(page: Page, model: str) -> Any:
    return page.get_by_role("option").filter(has=page.get_by_text(model, exact=True))


def _loaded(option: Any) -> Any:
    """What the page shows of a loaded model whether or not the mouse is over it (its Unload button shows only
    on hover, and the list reorders as models load, so a hover would be on another model by then)."""
    return option.get_by_role("button", name="Model information")


@pytest.mark.parametrize("kind", ["modelyard", "router mode"])
def test_the_ui_lists_selects_loads_chats_and_unloads(browser: Browser, routers: dict[str, str],  # noqa: F811
                                                      kind: str) -> None:
    url = routers[kind]
    tag = kind.replace(" ", "-")
    ARTIFACTS.mkdir(exist_ok=True)
    # the service worker would precache all 10 MB of the UI on this 2-core machine; sw.js is checked above
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 800}, service_workers="block")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # What the page asked and got, for the failure message: this step failed in 4 of 5 clean-clone make test
    # runs (never alone), and the page's side of it is what the next look needs.
    traffic: list[str] = []
    page.on("request", lambda r: traffic.append(f"{time.monotonic():.3f} -> {r.method} {r.url}"))
    page.on("response", lambda r: traffic.append(f"{time.monotonic():.3f} <- {r.status} {r.url}"))
    page.on("requestfailed", lambda r: traffic.append(f"{time.monotonic():.3f} x {r.url} {r.failure}"))
    try:
        page.goto("/", wait_until="load")
        _open_menu(page)
        expect(page.get_by_role("option")).to_have_count(3)
        assert sorted(page.get_by_role("option").all_inner_texts()) == ["gemma", "smol", "smol-b"]
        with page.expect_request(lambda r: r.url.endswith("/models/load")) as load:
            _option(page, "smol").click()  # selecting a model loads it
        assert json.loads(load.value.post_data or "{}") == {"model": "smol"}
        expect(_model_menu(page)).to_have_text("smol")
        _model_menu(page).click()
        try:
            expect(_loaded(_option(page, "smol"))).to_have_count(1, timeout=LOAD_TIMEOUT_MS)
        except AssertionError as failure:
            listing = httpx.get(url + "/models").text[:3000]
            raise AssertionError(f"{failure}\npage traffic:\n" + "\n".join(
                line for line in traffic if "/_app/" not in line) + f"\n/models: {listing}") from failure
        _wait_status(url, "smol", "loaded")
        page.screenshot(path=ARTIFACTS / f"webui-{tag}-loaded.png")
        page.keyboard.press("Escape")
        page.keyboard.press("Escape")

        box = page.get_by_placeholder("Type a message...")
        box.fill("Name three colours.")
        with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
            box.press("Enter")
        response = answer.value
        body = json.loads(response.request.post_data or "{}")
        assert (body["model"], body["stream"]) == ("smol", True)
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.text().splitlines() if line.startswith("data: ")]  # to its end
        assert len(events) > 2 and events[-1] == "data: [DONE]"  # it came as a stream of deltas
        expect(page.get_by_role("button", name="Stop")).to_have_count(0)  # the page took the end too
        reply = page.get_by_role("group", name="Assistant message with actions").locator(".markdown-content")
        expect(reply).to_have_text(re.compile(r"\w"))
        page.screenshot(path=ARTIFACTS / f"webui-{tag}-chat.png")

        _model_menu(page).click()
        option = _option(page, "smol")
        option.hover()
        with page.expect_request(lambda r: r.url.endswith("/models/unload")) as unload:
            option.get_by_role("button", name="Unload model").click()
        assert json.loads(unload.value.post_data or "{}") == {"model": "smol"}
        expect(_loaded(option)).to_have_count(0, timeout=LOAD_TIMEOUT_MS)
        _wait_status(url, "smol", "unloaded")
        page.screenshot(path=ARTIFACTS / f"webui-{tag}-unloaded.png")
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


@pytest.mark.parametrize("kind", ["modelyard", "router mode"])
def test_a_model_list_asked_for_before_a_load_ended_does_not_undo_it(browser: Browser,  # noqa: F811
                                                                     routers: dict[str, str], kind: str) -> None:
    """engine/webui_patch.py's fix, with its race made to happen every time: the list the model menu asks for
    on opening is answered (with what the router said when asked) only after the page has taken the feed's
    'loaded' (its "Model loaded" toast). Unpatched, the row went back to "unloaded" and showed so until a
    refetch: the test above failed so in most `make test` runs, where loads take 0.1-0.35 s. Both routers
    serve the same build; against the unpatched build this fails for router mode every time, while modelyard's
    variant passed (what else there sets the row again is not found yet)."""
    url = routers[kind]
    model = "smol-b"  # not the model the test above loads and unloads
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 800}, service_workers="block")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    held: list[tuple[Route, Any]] = []

    def hold(route: Route) -> None:
        held.append((route, route.fetch().json()))  # the router's answer now; the page gets it later

    try:
        page.goto("/", wait_until="load")
        _open_menu(page)
        expect(page.get_by_role("option")).to_have_count(3)
        page.keyboard.press("Escape")
        expect(page.get_by_role("option")).to_have_count(0)
        page.route("**/v1/models", hold)
        _model_menu(page).click()  # the menu asks for the list: held
        while not held:  # the handler runs as the page's events are taken; this takes them
            page.wait_for_timeout(10)
        (_, before), = held
        assert next(row["status"]["value"] for row in before["data"] if row["id"] == model) == "unloaded"
        with page.expect_request(lambda r: r.url.endswith("/models/load")):
            _option(page, model).click()
        expect(page.get_by_text(f"Model loaded: {model}")).to_be_visible(timeout=LOAD_TIMEOUT_MS)
        held.pop()[0].fulfill(json=before)  # the old list arrives after the feed's 'loaded'

        _model_menu(page).click()  # its own list is held while the page shows what it has
        expect(_loaded(_option(page, model))).to_have_count(1)
        for route, _ in held:
            route.fulfill(json=route.fetch().json())
        page.unroute("**/v1/models")
    finally:
        context.close()
        httpx.post(f"{url}/models/unload", json={"model": model})
    _wait_status(url, model, "unloaded")
    assert not errors, f"the page threw: {errors}"
