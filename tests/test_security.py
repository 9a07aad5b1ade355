"""Browser-facing security and scoped API keys (issue 9, points 1 and 3): the pure decisions as table tests
(Origin, Host, the route -> scope table, keys files, model patterns), the middlewares and handlers in-process
over aiohttp's test client (no child is started: refusals and listings need none), and one end-to-end test of
`modelyard serve` refusing a hostile page's requests."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from modelyard.api import auth
from modelyard.api.app import build_app
from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import CONTEXT, AppContext, ServerSettings
from modelyard.api.cors import (
    CorsPolicy,
    exposure_warning,
    host_name,
    host_refusal,
    is_loopback_name,
    origin_refusal,
    parse_allowed_hosts,
)
from modelyard.cli import main
from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.config.options import OptionTable, parse_help
from modelyard.config.presets import ConfigError
from modelyard.engine.command import Engine
from modelyard.manager import FeedEvent, ModelManager, StatusEvent
from modelyard.memory import GgufCache
from modelyard.scheduler import Status
from tests.conftest import Router, fake_cmd

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"
DEFAULT_POLICY = CorsPolicy.from_settings()


# --- Origin -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("origin", "policy", "refused"), [
    (None, DEFAULT_POLICY, False),  # not a browser
    ("http://localhost:3000", DEFAULT_POLICY, False),
    ("https://127.0.0.1", DEFAULT_POLICY, False),
    ("vscode-webview://abc", DEFAULT_POLICY, False),
    ("https://evil.example", DEFAULT_POLICY, True),
    ("http://localhost.evil.example", DEFAULT_POLICY, True),
    ("null", DEFAULT_POLICY, True),  # sandboxed iframes: any site can send it
    ("null", CorsPolicy.from_settings("null"), False),  # unless listed
    ("https://evil.example", CorsPolicy.from_settings("*"), False),  # `*`: the operator allows every page
    ("https://app.lan", CorsPolicy.from_settings("https://*.lan"), False),
    ("https://app.lan", CorsPolicy.from_settings(None, "https://app.lan"), False),  # OLLAMA_ORIGINS adds
    ("http://[::1]:8000", CorsPolicy.from_settings("localhost"), False),
    ("https://evil.example", CorsPolicy.from_settings("localhost"), True),
])
def test_origin_decision(origin: str | None, policy: CorsPolicy, refused: bool) -> None:
    refusal = origin_refusal(origin, policy)
    assert (refusal is not None) == refused
    if refusal:
        assert origin in refusal and "--cors-origins" in refusal and "OLLAMA_ORIGINS" in refusal


# --- Host ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "loopback"), [
    ("localhost", True), ("LOCALHOST.", True), ("app.localhost", True), ("127.0.0.1", True),
    ("127.8.9.10", True), ("::1", True), ("0.0.0.0", False), ("192.168.1.2", False), ("evil.example", False),
    ("localhost.evil.example", False), ("127.0.0.1.nip.io", False), ("", False),
])
def test_loopback_names(name: str, loopback: bool) -> None:
    assert is_loopback_name(name) is loopback


@pytest.mark.parametrize(("header", "name"), [
    ("localhost:8080", "localhost"), ("[::1]:8080", "::1"), ("[::1]", "::1"), ("Example.LAN", "example.lan"),
    ("127.0.0.1", "127.0.0.1"), ("[::1", None), ("[::1]x", None), ("a:b", None), (":80", None),
    ("user@evil:80", None),
])
def test_host_header_names(header: str, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(("header", "bind", "allowed", "refused"), [
    (None, "127.0.0.1", "", False),  # HTTP/1.0 without Host
    ("localhost:8080", "127.0.0.1", "", False),
    ("127.0.0.1:8080", "localhost", "", False),
    ("[::1]:8080", "::1", "", False),
    ("app.localhost", "127.0.0.1", "", False),
    ("evil.example", "127.0.0.1", "", True),  # DNS rebinding
    ("evil.example:8080", "127.0.0.1", "", True),
    ("192.168.1.2:8080", "127.0.0.1", "", True),
    ("[::1", "127.0.0.1", "", True),  # malformed
    ("box.lan:8080", "127.0.0.1", "box.lan", False),
    ("BOX.lan", "127.0.0.1", "box.lan", False),
    ("a.box.lan", "127.0.0.1", "*.box.lan", False),
    ("evil.example", "127.0.0.1", "box.lan", True),
    ("evil.example", "127.0.0.1", "*", False),
    ("evil.example", "0.0.0.0", "", False),  # not loopback: Host is not checked without --allowed-hosts
    ("evil.example", "192.168.1.2", "", False),
    ("evil.example", "0.0.0.0", "box.lan", True),  # ... unless it is given
    ("localhost:1", "0.0.0.0", "box.lan", False),
    ("box.lan", "0.0.0.0", "box.lan", False),
])
def test_host_decision(header: str | None, bind: str, allowed: str, refused: bool) -> None:
    refusal = host_refusal(header, bind, parse_allowed_hosts(allowed))
    assert (refusal is not None) == refused
    if refusal:
        assert repr(header) in refusal and "--allowed-hosts" in refusal


def test_allowed_hosts_parsing() -> None:
    assert parse_allowed_hosts(" a.lan, ,B.lan,[::2]") == ("a.lan", "b.lan", "::2")
    assert parse_allowed_hosts(None) == ()


@pytest.mark.parametrize(("bind", "keys", "warned"), [
    ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
    ("0.0.0.0", False, True), ("", False, True), ("192.168.1.2", False, True), ("0.0.0.0", True, False),
])
def test_exposure_warning(bind: str, keys: bool, warned: bool) -> None:
    warning = exposure_warning(bind, keys)
    assert (warning is not None) == warned
    if warning:
        assert "LLAMA_API_KEY" in warning and "--api-key-file" in warning


# --- the route -> scope table -------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "query", "scope"), [
    ("GET", "/health", {}, None), ("GET", "/v1/health", {}, None),
    ("GET", "/", {}, None), ("HEAD", "/", {}, None),
    ("GET", "/models", {}, Scope.READ), ("GET", "/v1/models", {}, Scope.READ),
    ("GET", "/models", {"reload": "1"}, Scope.ADMIN), ("GET", "/v1/models", {"reload": "true"}, Scope.ADMIN),
    ("GET", "/models", {"reload": "0"}, Scope.READ),
    ("GET", "/v1/models/smol", {}, Scope.READ), ("GET", "/models/sse", {}, Scope.READ),
    ("GET", "/props", {}, Scope.READ), ("GET", "/props", {"model": "smol"}, Scope.INFERENCE),
    ("POST", "/props", {}, Scope.ADMIN),
    ("GET", "/api/tags", {}, Scope.READ), ("HEAD", "/api/tags", {}, Scope.READ), ("GET", "/api/ps", {}, Scope.READ),
    ("GET", "/api/version", {}, Scope.READ), ("POST", "/api/show", {}, Scope.READ),
    ("POST", "/models/load", {}, Scope.ADMIN), ("POST", "/models/unload", {}, Scope.ADMIN),
    ("POST", "//models//unload/", {}, Scope.ADMIN),  # served as /models/unload by the tolerant routing
    ("POST", "/slots/0", {"action": "erase"}, Scope.ADMIN), ("POST", "/lora-adapters", {}, Scope.ADMIN),
    ("POST", "/api/pull", {}, Scope.ADMIN), ("DELETE", "/api/delete", {}, Scope.ADMIN),
    ("POST", "/v1/chat/completions", {}, Scope.INFERENCE), ("POST", "/completion", {}, Scope.INFERENCE),
    ("POST", "/v1/embeddings", {}, Scope.INFERENCE), ("POST", "/tokenize", {}, Scope.INFERENCE),
    ("POST", "/v1/messages", {}, Scope.INFERENCE),
    ("POST", "/api/chat", {}, Scope.INFERENCE), ("POST", "/api/generate", {}, Scope.INFERENCE),
    ("POST", "/api/embed", {}, Scope.INFERENCE), ("POST", "/api/embeddings", {}, Scope.INFERENCE),
    ("GET", "/slots", {"model": "smol"}, Scope.INFERENCE), ("GET", "/metrics", {"model": "smol"}, Scope.INFERENCE),
    ("POST", "/models", {}, Scope.ADMIN), ("DELETE", "/models", {"model": "o/r:Q4_0"}, Scope.ADMIN),
    ("GET", "/no/such/route", {}, Scope.READ),
])
def test_route_scopes(method: str, path: str, query: dict[str, str], scope: Scope | None) -> None:
    assert auth.required_scope(method, path, query) == scope


def _sample_path(path: str) -> str:
    return path.replace("{model:.+}", "smol").replace("{model}", "smol").replace("{id}", "0").replace(
        "{digest}", "sha256-0")


def test_every_route_has_an_explicit_scope(app_factory: Callable[..., web.Application]) -> None:
    """A new route must be put in the table on purpose, not fall through to the default."""
    missing = []
    for route in app_factory().router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = _sample_path(str(info.get("path") or info.get("formatter")))
        methods = ["POST", "GET", "DELETE"] if route.method == "*" else [route.method]
        for method in methods:
            if method != "HEAD" and auth.matching_rule(method, path, {}) is None:
                missing.append(f"{method} {path}")
    assert not missing


# --- keys ---------------------------------------------------------------------------------------------------

def test_find_key_compares_every_key_and_hides_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tuple(ApiKey(f"secret-{i}", label=f"k{i}") for i in range(5))
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for offered, expected in (("secret-0", keys[0]), ("secret-4", keys[4]), ("nope", None), ("", None)):
        calls.clear()
        assert auth.find_key(keys, offered) is expected
        assert len(calls) == len(keys)  # no early exit that would tell which key matched
    assert auth.find_key(keys, None) is None
    assert "secret-0" not in repr(keys[0]) and "secret-0" not in str(keys)


@pytest.mark.parametrize(("headers", "offered"), [
    ({"Authorization": "Bearer abc"}, "abc"), ({"Authorization": "bearer  abc "}, "abc"),
    ({"X-Api-Key": "abc"}, "abc"), ({}, None), ({"Authorization": "Basic abc"}, None),
])
def test_offered_key(headers: dict[str, str], offered: str | None) -> None:
    assert auth.offered_key(headers) == offered


def _model(name: str, *aliases: str) -> ModelConfig:
    return ModelConfig(name=name, settings={}, source="preset", origin="test", aliases=aliases)


@pytest.mark.parametrize(("patterns", "model", "allowed"), [
    ((), _model("anything"), True),
    (("smol*",), _model("smollm2-135m"), True),
    (("smol*",), _model("gemma3"), False),
    (("assistant",), _model("gemma3", "assistant"), True),  # aliases count
    (("gemma3-270m", "smol*"), _model("gemma3-270m"), True),
    (("Smol*",), _model("smol"), False),  # names are case-sensitive, as lookups are
    (("smol?",), _model("smolb"), True),
])
def test_model_patterns(patterns: tuple[str, ...], model: ModelConfig, allowed: bool) -> None:
    assert ApiKey("k", models=patterns).may_use(auth.model_names(model)) is allowed


def test_admin_implies_the_other_scopes() -> None:
    admin = ApiKey("k", frozenset({Scope.ADMIN}))
    assert all(admin.has(scope) for scope in Scope)
    reader = ApiKey("k", frozenset({Scope.READ}))
    assert reader.has(Scope.READ) and not reader.has(Scope.INFERENCE) and not reader.has(Scope.ADMIN)
    assert not auth.ANONYMOUS.may_use(("x",)) and not any(auth.ANONYMOUS.has(s) for s in Scope)


def test_authorise_decisions() -> None:
    reader = ApiKey("r", frozenset({Scope.READ}), label="keys.toml [[key]] entry 1")
    keys = (reader, ApiKey("a", label="--api-key"))
    assert auth.authorise((), {}, "POST", "/models/unload", {}) is None  # no keys: full access
    assert auth.authorise(keys, {}, "GET", "/health", {}) is auth.ANONYMOUS
    assert auth.authorise(keys, {"X-Api-Key": "r"}, "GET", "/health", {}) is reader
    assert auth.authorise(keys, {}, "GET", "/models", {}) == auth.Refusal(401, "Invalid API Key")
    assert auth.authorise(keys, {"X-Api-Key": "x"}, "GET", "/models", {}) == auth.Refusal(401, "Invalid API Key")
    assert auth.authorise(keys, {"X-Api-Key": "r"}, "GET", "/models", {}) is reader
    refused = auth.authorise(keys, {"X-Api-Key": "r"}, "POST", "/models/load", {})
    assert isinstance(refused, auth.Refusal) and refused.status == 403
    assert "'admin'" in refused.message and "entry 1" in refused.message and "POST /models/load" in refused.message
    assert "r" not in refused.message.replace("for", "").split("(")[0]  # the secret is not echoed
    assert auth.authorise(keys, {"Authorization": "Bearer a"}, "POST", "/models/load", {}) == keys[1]


GOOD_TOML = """
[[key]]
name = "ci"
key = "ci-secret"
scopes = ["inference", "read"]
models = ["smol*", "gemma3-270m"]

[[key]]
key_env = "ADMIN_KEY"
scopes = ["admin"]
"""


def test_toml_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(GOOD_TOML)
    ci, admin = auth.read_keys_file(path, {"ADMIN_KEY": "from-env"})
    assert ci == ApiKey("ci-secret", frozenset({Scope.INFERENCE, Scope.READ}), ("smol*", "gemma3-270m"),
                        label='keys.toml [[key]] entry 1 "ci"')
    assert admin.secret == "from-env" and admin.scopes == {Scope.ADMIN} and admin.models == ()
    assert admin.label == "keys.toml [[key]] entry 2"


def test_plain_keys_file_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# comment\n\n  one  \ntwo\n")
    keys = auth.read_keys_file(path)
    assert [k.secret for k in keys] == ["one", "two"]
    assert all(k.scopes == auth.ALL_SCOPES and not k.models for k in keys)
    assert keys[0].label == "keys.txt line 3"
    assert [k.secret for k in auth.keys_from_list(" a, ,b", "--api-key")] == ["a", "b"]


@pytest.mark.parametrize(("text", "error"), [
    ("[[key]\n", "not valid TOML"),
    ("", "no keys"),
    ("key = 'x'\n", "no keys"),
    ("[server]\nx = 1\n", "unknown top-level key(s) server"),
    ("[[key]]\nscopes = ['read']\n", "entry 1: give exactly one of key and key_env"),
    ("[[key]]\nkey = 'a'\nkey_env = 'B'\nscopes = ['read']\n", "exactly one of key and key_env"),
    ("[[key]]\nkey = 'a'\nscopes = ['read']\n[[key]]\nkey = 'b'\n", "entry 2: scopes is missing"),
    ("[[key]]\nkey = 'a'\nscopes = ['root']\n", "unknown scope(s) root; the scopes are read, inference, admin"),
    ("[[key]]\nkey = 'a'\nscopes = []\n", "scopes must be a non-empty list"),
    ("[[key]]\nkey = 'a'\nscopes = 'read'\n", "scopes must be a non-empty list"),
    ("[[key]]\nkey = 'a'\nscopes = ['read']\nmodels = 'smol'\n", "models must be a list"),
    ("[[key]]\nkey = 'a'\nscopes = ['read']\nmodels = []\n", "models is empty"),
    ("[[key]]\nkey = 'a'\nscopes = ['read']\nmodel = ['x']\n", "unknown field(s) model"),
    ("[[key]]\nkey = ''\nscopes = ['read']\n", "key must be a non-empty string"),
    ("[[key]]\nkey = 5\nscopes = ['read']\n", "key must be a non-empty string"),
    ("[[key]]\nkey = 'a b'\nscopes = ['read']\n", "key contains whitespace"),
    ("[[key]]\nkey_env = 'UNSET_VAR'\nscopes = ['read']\n", "environment variable UNSET_VAR (key_env) is not set"),
    ("[[key]]\nname = 'x'\nkey = 'a'\nscopes = ['read']\n[[key]]\nkey = 'a'\nscopes = ['admin']\n",
     'entry 2 has the same key as keys.toml [[key]] entry 1 "x"'),
    ("[[key]]\nname = ''\nkey = 'a'\nscopes = ['read']\n", "name must be a non-empty string"),
    ("key = 1\n[[key]]\n", "not valid TOML"),
])
def test_malformed_toml_keys_files_are_refused(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        auth.read_keys_file(path, {})
    assert str(raised.value).startswith(f"{path}: ") and error in str(raised.value)
    assert "\n" not in str(raised.value).strip()


def test_unreadable_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        auth.read_keys_file(path)


# --- in-process: the middlewares and handlers ---------------------------------------------------------------

class _Source:
    def __init__(self, models: list[ModelConfig]) -> None:
        self.models = models

    def load(self) -> Catalog:
        return Catalog({m.name: m for m in self.models}, {n: m.name for m in self.models for n in auth.model_names(m)})


def _file_model(tmp_path: Path, name: str, *aliases: str) -> ModelConfig:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"")  # listings stat the file; nothing reads it as no child starts
    return ModelConfig(name=name, settings={"--model": str(path)}, source="preset", origin="test", aliases=aliases)


@pytest.fixture
def app_factory(tmp_path: Path) -> Callable[..., web.Application]:
    def make(**settings: Any) -> web.Application:
        models = [_file_model(tmp_path, "smol", "assistant"), _file_model(tmp_path, "smol-b"),
                  _file_model(tmp_path, "gemma")]
        engine = Engine(tmp_path / "llama-server", OptionTable(parse_help(HELP.read_text())))
        source = _Source(models)
        manager = ModelManager(source, engine, catalog=source.load(), gpus=False, gguf_cache=GgufCache(tmp_path))
        return build_app(AppContext(manager, ServerSettings(**{"autoload": False, **settings})))
    return make


READER = ApiKey("read-key", frozenset({Scope.READ}), ("smol*",), label="keys.toml [[key]] entry 1")
RUNNER = ApiKey("run-key", frozenset({Scope.INFERENCE}), ("smol",), label="keys.toml [[key]] entry 2")
OPERATOR = ApiKey("op-key", frozenset({Scope.ADMIN}), ("gemma",), label="keys.toml [[key]] entry 3")
ROOT = ApiKey("root-key", label="--api-key")
KEYS = (READER, RUNNER, OPERATOR, ROOT)


@pytest.fixture
async def client(app_factory: Callable[..., web.Application]) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(**settings: Any) -> TestClient[web.Request, web.Application]:
        test_client = TestClient(TestServer(app_factory(**settings)))
        await test_client.start_server()
        clients.append(test_client)
        return test_client

    yield make
    for test_client in clients:
        await test_client.close()


def bearer(key: ApiKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.secret}"}


async def test_cross_origin_simple_post_is_refused_before_any_handler(client: Any) -> None:
    c = await client()
    for path, body in (("/models/unload", '{"model": "smol"}'), ("/api/generate", '{"model": "smol"}'),
                       ("/v1/chat/completions", '{"model": "smol"}')):
        response = await c.post(path, data=body, headers={"Origin": "https://evil.example",
                                                          "Content-Type": "text/plain"})
        assert response.status == 403
        error = (await response.json())["error"]
        assert error["type"] == "permission_error" and error["code"] == "forbidden"
        assert "https://evil.example" in error["message"] and "--cors-origins" in error["message"]
        assert "Access-Control-Allow-Origin" not in response.headers
    preflight = await c.options("/models/unload", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403
    null = await c.post("/models/unload", data="{}", headers={"Origin": "null"})
    assert null.status == 403


async def test_allowed_origin_reaches_the_handler_with_cors_headers(client: Any) -> None:
    c = await client()
    response = await c.post("/models/unload", json={"model": "smol"}, headers={"Origin": "http://localhost:3000"})
    assert response.status == 400 and (await response.json())["error"]["code"] == "model_not_running"
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    no_origin = await c.get("/v1/models")
    assert no_origin.status == 200


async def test_foreign_host_is_refused_on_a_loopback_bind(client: Any) -> None:
    c = await client()
    refused = await c.get("/v1/models", headers={"Host": "evil.example:8080"})
    assert refused.status == 403
    message = (await refused.json())["error"]["message"]
    assert "'evil.example:8080'" in message and "--allowed-hosts" in message
    assert (await c.get("/health", headers={"Host": "evil.example"})).status == 403
    for host in ("localhost:8080", "127.0.0.1", "[::1]:1", "app.localhost"):
        assert (await c.get("/v1/models", headers={"Host": host})).status == 200, host
    listed = await client(allowed_hosts=("box.lan",))
    assert (await listed.get("/v1/models", headers={"Host": "box.lan:8080"})).status == 200
    assert (await listed.get("/v1/models", headers={"Host": "evil.example"})).status == 403
    public = await client(bind_host="0.0.0.0")
    assert (await public.get("/v1/models", headers={"Host": "evil.example"})).status == 200


async def test_keys_and_scopes(client: Any) -> None:
    c = await client(api_keys=KEYS)
    assert (await c.get("/health")).status == 200  # open, as before
    missing = await c.get("/v1/models")
    assert missing.status == 401 and (await missing.json())["error"]["type"] == "authentication_error"
    assert (await c.get("/v1/models", headers={"X-Api-Key": "wrong"})).status == 401
    load = await c.post("/models/load", json={"model": "smol"}, headers=bearer(READER))
    assert load.status == 403
    error = (await load.json())["error"]
    assert error["code"] == "forbidden" and "'admin'" in error["message"] and "read-key" not in error["message"]
    sneaky = await c.post("/models//unload/", json={"model": "smol"}, headers=bearer(READER))
    assert sneaky.status == 403  # the tolerant path routing does not walk around the scope
    served = await c.post("/models//unload/", json={"model": "smol"}, headers=bearer(ROOT))
    assert (await served.json())["error"]["code"] == "model_not_running"  # that path is served as the unload
    assert (await c.get("/models?reload=1", headers=bearer(READER))).status == 403
    assert (await c.post("/v1/chat/completions", json={"model": "smol"}, headers=bearer(READER))).status == 403
    assert (await c.get("/v1/models", headers=bearer(RUNNER))).status == 403  # inference alone lists nothing
    assert (await c.get("/api/tags", headers=bearer(ROOT))).status == 200


async def test_model_patterns_on_model_routes(client: Any) -> None:
    c = await client(api_keys=KEYS)
    forbidden = await c.post("/v1/chat/completions", json={"model": "gemma", "messages": []},
                             headers=bearer(RUNNER))
    assert forbidden.status == 403
    message = (await forbidden.json())["error"]["message"]
    assert "'gemma'" in message and "smol" in message
    # an allowed model passes the check and reaches the manager (autoload off: no child is started)
    allowed = await c.post("/v1/chat/completions", json={"model": "assistant", "messages": []},
                           headers=bearer(RUNNER))
    assert allowed.status == 400 and (await allowed.json())["error"]["code"] == "model_not_loaded"
    unknown = await c.post("/v1/chat/completions", json={"model": "nope"}, headers=bearer(RUNNER))
    assert unknown.status == 404
    assert (await c.get("/props?model=gemma", headers=bearer(RUNNER))).status == 403
    for path in ("/api/generate", "/api/chat", "/api/embed"):
        ollama = await c.post(path, json={"model": "gemma:latest", "prompt": "hi", "messages": [{"role": "user"}],
                                          "input": "x"}, headers=bearer(RUNNER))
        assert ollama.status == 403, path
        assert "'gemma'" in (await ollama.json())["error"]  # Ollama's own error shape
    show = await c.post("/api/show", json={"model": "gemma"}, headers=bearer(READER))
    assert show.status == 403
    admin_elsewhere = await c.post("/models/unload", json={"model": "smol"}, headers=bearer(OPERATOR))
    assert admin_elsewhere.status == 403 and "'smol'" in (await admin_elsewhere.json())["error"]["message"]
    own = await c.post("/models/unload", json={"model": "gemma"}, headers=bearer(OPERATOR))
    assert own.status == 400 and (await own.json())["error"]["code"] == "model_not_running"
    assert (await c.get("/v1/models/gemma", headers=bearer(READER))).status == 403
    assert (await c.get("/v1/models/smol-b", headers=bearer(READER))).status == 200


async def test_listings_show_only_the_keys_models(client: Any) -> None:
    c = await client(api_keys=KEYS)

    async def ids(path: str, key: ApiKey) -> list[str]:
        body = await (await c.get(path, headers=bearer(key))).json()
        return sorted(m["id"] for m in body["data"]) if "data" in body else sorted(m["name"] for m in body["models"])

    assert await ids("/v1/models", READER) == ["smol", "smol-b"]
    assert await ids("/models", OPERATOR) == ["gemma"]
    assert await ids("/models", ROOT) == ["gemma", "smol", "smol-b"]
    assert await ids("/api/tags", READER) == ["smol-b:latest", "smol:latest"]
    assert await ids("/api/ps", READER) == []
    open_app = await client()
    everything = await (await open_app.get("/api/tags")).json()  # no keys configured: every model
    assert sorted(m["name"] for m in everything["models"]) == ["gemma:latest", "smol-b:latest", "smol:latest"]


async def test_status_feed_shows_only_the_keys_models(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    c = await client(api_keys=KEYS)
    manager = c.app[CONTEXT].manager
    subscribed = asyncio.Event()
    subscribe = manager.subscribe

    @contextlib.asynccontextmanager
    async def signalling() -> AsyncIterator[asyncio.Queue[FeedEvent | None]]:
        async with subscribe() as queue:
            subscribed.set()
            yield queue

    monkeypatch.setattr(manager, "subscribe", signalling)
    response = await c.get("/models/sse", headers=bearer(READER))
    assert response.status == 200
    await subscribed.wait()  # the handler subscribes after sending its headers
    for name in ("gemma", "smol", "removed-by-reload", "smol-gone"):
        manager._publish(StatusEvent(name, Status.LOADING))
    seen: list[str] = []
    while len(seen) < 2:
        line = (await response.content.readline()).decode().strip()
        if line.startswith("data: "):
            seen.append(json.loads(line[6:])["model"])
    assert seen == ["smol", "smol-gone"]  # gemma, and a removed model its patterns miss, are not shown
    response.close()


# --- end to end: `modelyard serve` against a hostile page ---------------------------------------------------

def test_hostile_page_cannot_drive_the_server(tmp_path: Path, start_router: Callable[..., Router]) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\nstop-timeout = 2\nload-on-startup = true\n")
    router = start_router("--models-preset", str(preset))
    router.wait_status("a", "loaded")
    hostile = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    for path in ("/models/unload", "/api/generate"):
        response = router.client.post(path, content='{"model": "a", "prompt": "hi"}', headers=hostile)
        assert response.status_code == 403, path
        assert "https://evil.example" in response.json()["error"]["message"]
    rebinding = router.client.get("/v1/models", headers={"Host": "evil.example"})
    assert rebinding.status_code == 403 and "--allowed-hosts" in rebinding.json()["error"]["message"]
    assert router.status("a") == "loaded"
    assert "refused POST /models/unload: origin https://evil.example" in router.log()
    with httpx.Client(base_url=router.url) as plain:
        assert plain.post("/models/unload", json={"model": "a"}).status_code == 200  # a non-browser still can


def test_startup_warnings(tmp_path: Path, start_router: Callable[..., Router]) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    exposed = start_router("--models-preset", str(preset), "--host", "0.0.0.0")
    on_command_line = start_router("--models-preset", str(preset), "--api-key", "visible-key")
    from_env = start_router("--models-preset", str(preset), env={"LLAMA_API_KEY": "hidden-key"})
    assert "listening on 0.0.0.0 without an API key" in exposed.log()
    assert "process list" not in exposed.log()
    assert "--api-key on the command line can be read by every local user" in on_command_line.log()
    assert "without an API key" not in on_command_line.log() + from_env.log()
    assert "process list" not in from_env.log()
    assert "visible-key" not in on_command_line.log() and "hidden-key" not in from_env.log()  # never echoed


def test_malformed_keys_file_stops_the_start(tmp_path: Path) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    keys = tmp_path / "keys.toml"
    keys.write_text("[[key]]\nkey = 'a'\nscopes = ['superuser']\n")
    result = CliRunner().invoke(main, ["serve", "--models-preset", str(preset), "--api-key-file", str(keys)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {keys}: [[key]] entry 1: unknown scope(s) superuser; "
                                     "the scopes are read, inference, admin")
