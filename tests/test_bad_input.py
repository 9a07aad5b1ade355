"""Bad input never reaches a 500 or breaks a listing (issue 9, point 8): each reproduction of the fault campaign
as a test. In-process (aiohttp's test client over a manager whose engine cannot start: a refusal that came too
late would show as a load failure), plus subprocess runs of `modelyard serve` for start-up failures and the real
engine for the embeddings refusal and keep_alive end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from modelyard.api.app import build_app
from modelyard.api.body import charset_problem, parse_json_object
from modelyard.api.context import AppContext, ServerSettings
from modelyard.api.json import dumps
from modelyard.api.ollama import _iso
from modelyard.config import models_dir as models_dir_module
from modelyard.config.catalog import Catalog, ModelConfig, parse_engine_args
from modelyard.config.durations import FOREVER, MAX_SECONDS, parse_duration
from modelyard.config.models_dir import scan_models_dir
from modelyard.config.options import OptionTable, environment_refusal, parse_help
from modelyard.config.presets import ConfigError, read_preset_file
from modelyard.engine.command import Engine
from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache
from modelyard.scheduler import Status

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity, as JavaScript's JSON.parse does."""
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


# --- 1. durations -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (300, 300.0), ("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0), (0, 0.0), ("0", 0.0), (1.5, 1.5),
    (-1, FOREVER), ("-1", FOREVER), ("-1m", FOREVER), (-1e20, FOREVER), (MAX_SECONDS, MAX_SECONDS),
    ("87600h", MAX_SECONDS),
])
def test_durations_accepted(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(("value", "why"), [
    (1e20, "too long"), ("1e20", "too long"), (3e11, "too long"), ("99999999h", "too long"),
    (MAX_SECONDS + 1, "too long"), ("inf", "not a finite"), ("-inf", "not a finite"), ("nan", "not a finite"),
    (math.nan, "not a finite"), (math.inf, "not a finite"), ("1e400", "not a finite"), (10**400, "not a finite"),
    (-10**400, "not a finite"), ("soon", "not a duration"), ("", "not a duration"), (True, "not a duration"),
    (None, "not a duration"), ([5], "not a duration"), ("5x", "not a duration"),
])
def test_durations_refused_naming_forms_and_range(value: object, why: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_duration(value, "keep_alive")
    message = str(error.value)
    assert why in message and "keep_alive" in message and '"5m"' in message and "10 years" in message
    assert len(message) < 300  # a 400-digit number is not echoed whole


def test_preset_keep_alive_refused(tmp_path: Path) -> None:
    from modelyard.config.catalog import Sources, build_catalog
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    preset = tmp_path / "models.ini"
    preset.write_text(f"[m]\nmodel = {gguf}\nkeep-alive = inf\n")
    with pytest.raises(ConfigError, match=r"\[m\]: keep-alive = 'inf': keep-alive 'inf' is not a finite"):
        build_catalog(Sources(OptionTable(parse_help(HELP.read_text())), preset_path=preset))


def test_expiry_past_year_9999_is_forever_not_a_500() -> None:
    assert _iso(1e20) == "9999-12-31T23:59:59Z"
    assert _iso(0).startswith("1970-01-01T00:00:00")


# --- 2. strict JSON -----------------------------------------------------------------------------------------

def test_dumps_writes_null_for_non_finite_floats() -> None:
    assert strict_loads(dumps({"a": math.nan, "b": math.inf, "c": -math.inf, 1: 2})) == {
        "a": None, "b": None, "c": None, "1": 2}


# --- 3. bodies ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("charset", "refused"), [
    (None, None), ("utf-8", None), ("UTF-8", None), ("utf8", None), ("us-ascii", None),
    ("latin-1", "unsupported charset 'latin-1'"), ("utf-16", "unsupported charset"),
    ("klingon", "unknown charset 'klingon'"),
])
def test_charset_rule(charset: str | None, refused: str | None) -> None:
    problem = charset_problem(charset)
    assert problem == refused if refused is None else (problem is not None and refused in problem)


@pytest.mark.parametrize(("body", "message"), [
    (b"", "is empty"), (b"  ", "is empty"), (b"null", "not null"), (b"[1]", "not an array"),
    (b'"x"', "not a string"), (b"{oops", "not valid JSON"), (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"model": "\xff"}', "not UTF-8"), (b'{"a": NaN}', "not valid JSON"), (b'{"a": 1e400}', "not valid JSON"),
])
def test_body_refusals(body: bytes, message: str) -> None:
    with pytest.raises(ModelError) as error:
        parse_json_object(body)
    assert error.value.kind == ErrorKind.BAD_REQUEST and message in error.value.message


def test_body_at_the_depth_limit_is_read() -> None:
    assert set(parse_json_object(b'{"a": ' + b"[" * 1023 + b"]" * 1023 + b"}")) == {"a"}
    with pytest.raises(ModelError, match="nests too deeply"):
        parse_json_object(b'{"a": ' + b"[" * 1024 + b"]" * 1024 + b"}")


# --- in-process app -----------------------------------------------------------------------------------------

class _Source:
    def __init__(self, configs: list[ModelConfig]) -> None:
        self.configs = configs

    def load(self) -> Catalog:
        return Catalog({c.name: c for c in self.configs}, {c.name: c.name for c in self.configs})


@pytest.fixture
async def app_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TestClient[Any, Any]]:
    monkeypatch.setenv("MODELYARD_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_ARG_EMBEDDINGS", raising=False)
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"not a real gguf")
    configs = [
        ModelConfig("chat", {"--model": str(gguf)}, "preset", "test"),
        ModelConfig("embedder", {"--model": str(gguf), "--embeddings": "true"}, "preset", "test"),
        ModelConfig("reranker", {"--model": str(gguf), "--reranking": "true"}, "preset", "test"),
        ModelConfig("other-engine", {}, "preset", "test", command="/nonexistent/engine --port ${PORT}"),
        # NaN-ish values pushed past the parsers, straight into the catalog: the listings must stay JSON.
        ModelConfig("odd", {"--model": str(gguf)}, "preset", "test", keep_alive=math.nan),
    ]
    engine = Engine(tmp_path / "no-llama-server", OptionTable(parse_help(HELP.read_text())))
    source = _Source(configs)
    manager = ModelManager(source, engine, catalog=source.load(), gpus=False, gguf_cache=GgufCache(tmp_path / "gguf"))
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(AppContext(manager, ServerSettings()))))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def _manager(client: TestClient[Any, Any]) -> ModelManager:
    from modelyard.api.context import CONTEXT
    return client.app[CONTEXT].manager  # type: ignore[index]


async def _post(client: TestClient[Any, Any], path: str, body: object | bytes,
                content_type: str = "application/json") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with client.post(path, data=data, headers={"Content-Type": content_type}) as reply:
        text = await reply.text()
        return reply.status, strict_loads(text)


def _openai_message(body: Any) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], dict), body
    return str(body["error"]["message"])


def _ollama_message(body: Any) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


def _no_child(client: TestClient[Any, Any]) -> None:
    assert all(_manager(client).status_of(name) == Status.UNLOADED for name in _manager(client).catalog.models)


@pytest.mark.parametrize("value", [1e20, 3e11, "inf", "-inf", "nan", "99999999h", "1e400"])
@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/v1/chat/completions"])
async def test_keep_alive_out_of_range_is_400(app_client: TestClient[Any, Any], path: str, value: object) -> None:
    body = {"model": "chat", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "input": "x",
            "keep_alive": value}
    status, reply = await _post(app_client, path, body)
    message = _ollama_message(reply) if path.startswith("/api/") else _openai_message(reply)
    assert status == 400 and "keep_alive" in message and "10 years" in message
    _no_child(app_client)


LISTINGS = ("/models", "/v1/models", "/v1/models/odd", "/api/tags", "/api/ps", "/props", "/health")


async def test_every_listing_is_strict_json(app_client: TestClient[Any, Any]) -> None:
    for path in LISTINGS:
        async with app_client.get(path) as reply:
            assert reply.status == 200, path
            strict_loads(await reply.text())
    async with app_client.get("/models") as reply:
        odd = next(m for m in (await reply.json())["data"] if m["id"] == "odd")
    assert odd["keep_alive"] is None  # NaN became null


async def test_listings_survive_a_vanished_model_file(app_client: TestClient[Any, Any], tmp_path: Path) -> None:
    (tmp_path / "chat.gguf").unlink()
    for path in ("/api/tags", "/models"):
        async with app_client.get(path) as reply:
            assert reply.status == 200, path
            strict_loads(await reply.text())
    status, _ = await _post(app_client, "/api/show", {"model": "chat"})
    assert status == 200


DEEP = b'{"model": "chat", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("path", ["/models/load", "/models/unload", "/v1/chat/completions", "/v1/embeddings",
                                  "/completion", "/api/chat", "/api/generate", "/api/embed", "/api/show"])
async def test_deep_nesting_and_charsets_on_every_route(app_client: TestClient[Any, Any], path: str) -> None:
    message = _ollama_message if path.startswith("/api/") else _openai_message
    status, reply = await _post(app_client, path, DEEP)
    assert status == 400 and "nests too deeply" in message(reply)
    ok_body = {"model": "chat", "prompt": "x"}
    status, reply = await _post(app_client, path, ok_body, "application/json; charset=klingon")
    assert status == 415 and "klingon" in message(reply) and "UTF-8" in message(reply)
    status, reply = await _post(app_client, path, ok_body, "application/json; charset=latin-1")
    assert status == 415 and "latin-1" in message(reply)
    status, reply = await _post(app_client, path, b'{"model": "chat", "prompt": "caf\xe9"}')
    assert status == 400 and "not UTF-8" in message(reply)
    if not path.startswith("/api/"):
        assert reply["error"]["code"] in ("invalid_request",)
    _no_child(app_client)


async def test_management_model_field(app_client: TestClient[Any, Any]) -> None:
    status, reply = await _post(app_client, "/models/load", {"model": 5})
    assert status == 400 and "must be a string" in _openai_message(reply)
    status, reply = await _post(app_client, "/models/unload", {})
    assert status == 400 and "missing" in _openai_message(reply)
    status, reply = await _post(app_client, "/models/load", [])
    assert status == 400 and "JSON object" in _openai_message(reply)


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": {"function": {}}}]},
     "messages[0].tool_calls must be a list"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": "call it"}]}, "tool_calls must be a list"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [5]}]}, "tool_calls[0] must be an object"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}, "tool_calls[0] must be an object"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]}]},
     "tool_calls[0] must be an object"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "function.name must be"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]}, "function.name must be"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]},
     "function.arguments must be an object"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]},
     "function.arguments must be an object"),
    ({"messages": ["hi"]}, "messages[0]: each message must be an object"),
    ({"messages": [{"content": "hi"}]}, "with a role"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "with a role"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "hi", "images": [1]}]}, "images must be a list"),
    ({"messages": [{"role": "user", "content": "hi", "images": "aGk="}]}, "images must be a list"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_name": ["f"]}]}, "tool_name must be a string"),
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "no"}, "stream must be true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}},
     "options.temperature must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"seed": True}}, "options.seed must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"stop": [1]}}, "options.stop must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": 5}, "model must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": ["chat"]}, "model must be a string"),
])
async def test_chat_shape_errors_are_400(app_client: TestClient[Any, Any], body: dict[str, Any],
                                         message: str) -> None:
    status, reply = await _post(app_client, "/api/chat", {"model": "chat", **body})
    assert status == 400 and message in _ollama_message(reply), reply
    _no_child(app_client)


@pytest.mark.parametrize(("body", "message"), [
    ({"system": {"a": 1}}, "system must be a string"),
    ({"images": "x"}, "images must be a list"),
    ({"stream": 1}, "stream must be true or false"),
    ({"options": {"num_predict": "10"}}, "options.num_predict must be a number"),
])
async def test_generate_shape_errors_are_400(app_client: TestClient[Any, Any], body: dict[str, Any],
                                             message: str) -> None:
    status, reply = await _post(app_client, "/api/generate", {"model": "chat", "prompt": "x", **body})
    assert status == 400 and message in _ollama_message(reply), reply
    _no_child(app_client)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings", "/embedding", "/v1/embeddings/"])
async def test_openai_embeddings_refused_before_loading(app_client: TestClient[Any, Any], path: str) -> None:
    status, reply = await _post(app_client, path, {"model": "chat", "input": "x"})
    assert status == 400 and reply["error"]["code"] == "invalid_request"
    assert reply["error"]["message"] == ("model 'chat' does not serve embeddings; add `embeddings = true` to its "
                                         "section in the --models-preset file (or pass --embeddings)")
    _no_child(app_client)


@pytest.mark.parametrize(("path", "field"), [("/api/embed", "input"), ("/api/embeddings", "prompt")])
async def test_ollama_embeddings_refused_before_loading(app_client: TestClient[Any, Any], path: str,
                                                        field: str) -> None:
    status, reply = await _post(app_client, path, {"model": "chat", field: "x"})
    assert status == 400 and "`embeddings = true`" in _ollama_message(reply)
    _no_child(app_client)


def test_serves_embeddings_capability() -> None:
    def config(settings: dict[str, str], command: str | None = None) -> ModelConfig:
        return ModelConfig("m", settings, "preset", "test", command=command)
    assert not config({}).serves_embeddings({})
    assert not config({"--embeddings": "false"}).serves_embeddings({})
    assert config({"--embeddings": "true"}).serves_embeddings({})
    assert config({"--embeddings": "on"}).serves_embeddings({})
    assert config({"--reranking": "1"}).serves_embeddings({})
    assert config({}).serves_embeddings({"LLAMA_ARG_EMBEDDINGS": "true"})
    assert not config({}).serves_embeddings({"LLAMA_ARG_EMBEDDINGS": "0"})
    assert config({}, command="my-engine --port ${PORT}").serves_embeddings({})  # cannot know: not refused


async def test_embedding_models_are_not_refused(app_client: TestClient[Any, Any]) -> None:
    """The embedder (and a model of another engine) get past the check: they fail to load here, which shows
    the refusal is not what answered."""
    for model in ("embedder", "reranker", "other-engine"):
        status, reply = await _post(app_client, "/v1/embeddings", {"model": model, "input": "x"})
        assert status != 400 and "does not serve embeddings" not in _openai_message(reply), (model, reply)


@pytest.mark.parametrize("model_id", ["nope", "%00", "..%2F..%2Fetc%2Fpasswd", "a" * 5000, "chat:latest:x"])
async def test_odd_model_ids(app_client: TestClient[Any, Any], model_id: str) -> None:
    async with app_client.get(f"/v1/models/{model_id}") as reply:
        assert reply.status == 404
        assert "not found" in _openai_message(strict_loads(await reply.text()))


@pytest.mark.parametrize("query", ["reload=2", "autoload=maybe", "model=", "reload=1&reload=1"])
async def test_odd_query_parameters(app_client: TestClient[Any, Any], query: str) -> None:
    async with app_client.get(f"/models?{query}") as reply:
        assert reply.status == 200
        strict_loads(await reply.text())


# --- 6. models dir --------------------------------------------------------------------------------------------

def test_unreadable_entries_are_skipped_with_one_warning_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "good.gguf").write_bytes(b"GGUF")
    (tmp_path / "locked.gguf").write_bytes(b"GGUF")
    (tmp_path / "closed-folder").mkdir()
    (tmp_path / "closed-folder" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "no-stat").mkdir()
    (tmp_path / "ok-folder").mkdir()
    (tmp_path / "ok-folder" / "m.gguf").write_bytes(b"GGUF")
    # Tests run as root, where chmod 000 stops nothing: the three failures are simulated where they happen.
    real_iterdir, real_is_dir, real_open = Path.iterdir, Path.is_dir, models_dir_module.os.open

    def iterdir(self: Path) -> Any:
        if self.name == "closed-folder":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def is_dir(self: Path) -> bool:
        if self.name == "no-stat":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    def os_open(path: Any, flags: int, *args: Any) -> int:
        if Path(path).name == "locked.gguf":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(Path, "is_dir", is_dir)
    monkeypatch.setattr(models_dir_module.os, "open", os_open)
    caplog.set_level("WARNING", logger="modelyard.config.models_dir")
    for _ in range(2):  # at start and on a reload: the same warnings, once per scan
        caplog.clear()
        assert [m.name for m in scan_models_dir(tmp_path)] == ["good", "ok-folder"]
        warnings = sorted(r.getMessage() for r in caplog.records)
        assert len(warnings) == 3 and all("Permission denied" in w for w in warnings)
        assert [w.split(": ")[1].rsplit("/", 1)[1] for w in warnings] == ["closed-folder", "locked.gguf",
                                                                          "no-stat"]


def test_unreadable_models_dir_itself_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def iterdir(self: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(ConfigError, match=r"cannot read the models directory .*Permission denied"):
        scan_models_dir(tmp_path)


@pytest.mark.parametrize("args, refused", [
    (("--tools", "all"), "--tools"), (("--tools=read_file",), "--tools"), (("--tools-runtime", "docker:x"),
                                                                           "--tools-runtime"),
    (("-ag",), "-ag"), (("--agent",), "--agent"), (("--ui-mcp-proxy",), "--ui-mcp-proxy"),
    (("--webui-mcp-proxy",), "--webui-mcp-proxy"), (("--mcp-servers-config", "m.json"), "--mcp-servers-config"),
    (("--mcp-servers-json", "{}"), "--mcp-servers-json"),
    (("--no-agent", "-no-ag", "--no-ui-mcp-proxy", "--no-webui-mcp-proxy", "--tools="), None),  # off: fine
])
def test_agent_features_are_refused_wherever_written(args: tuple[str, ...], refused: str | None,
                                                     tmp_path: Path) -> None:
    """The flags, a preset's keys and the environment are checked alike (config/options.py `refusal`)."""
    table = OptionTable(parse_help(HELP.read_text()))
    preset = tmp_path / "models.ini"
    key, _, value = args[0].lstrip("-").partition("=")
    preset.write_text(f"[m]\n{key} = {value or (args[1] if len(args) > 1 else 'on')}\n")
    option = table.lookup(args[0].partition("=")[0])
    assert option is not None
    env = {option.env[0]: value or (args[1] if len(args) > 1 else "1")} if option.env else {}
    if refused is None:
        parse_engine_args(args, table)
        return
    with pytest.raises(ConfigError, match=f"^{refused} is not offered by modelyard: .*stay 403"):
        parse_engine_args(args, table)
    with pytest.raises(ConfigError, match=rf"\[m\]: {key} is not offered by modelyard"):
        read_preset_file(preset, table)
    assert (environment_refusal(env, table) or "").startswith(f"{option.env[0]} is not offered by modelyard")
    assert environment_refusal({option.env[0]: "0" if option.is_bool else ""}, table) is None


# --- 7. start-up failures ---------------------------------------------------------------------------------------

def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "modelyard.cli", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def fake_server(tmp_path: Path) -> Path:
    """A stand-in llama-server that prints b11434's --help: enough to start modelyard without the build."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\ncat {HELP}\n")
    binary.chmod(0o755)
    return binary


@pytest.mark.parametrize("case", [
    "missing-dir", "bad-preset", "preset-keep-alive", "keep-alive-flag", "max-wait-flag", "memory-budget",
    "memory-budget-inf", "gpu-budget", "unknown-flag", "directory-as-preset", "missing-keys-file", "bad-port",
    "load-timeout-flag", "tools-flag", "agent-env", "api-prefix",
])
def test_startup_failures_are_one_line(tmp_path: Path, fake_server: Path, case: str) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    preset = tmp_path / "models.ini"
    cases: dict[str, tuple[list[str], str]] = {
        "missing-dir": (["--models-dir", str(tmp_path / "nope")], "does not exist"),
        "bad-preset": (["--models-preset", str(preset)], "cannot parse"),
        "preset-keep-alive": (["--models-preset", str(preset)], "keep-alive 'nan' is not a finite"),
        "keep-alive-flag": (["--models-dir", str(tmp_path), "--keep-alive", "inf"], "--keep-alive 'inf'"),
        "max-wait-flag": (["--models-dir", str(tmp_path), "--max-wait", "1e30"], "--max-wait '1e30' is too long"),
        "memory-budget": (["--models-dir", str(tmp_path), "--memory-budget", "lots"], "--memory-budget 'lots'"),
        "memory-budget-inf": (["--models-dir", str(tmp_path), "--memory-budget", "inf%"], "--memory-budget 'inf%'"),
        "gpu-budget": (["--models-dir", str(tmp_path), "--gpu-memory-budget", "nan%"], "--gpu-memory-budget"),
        "unknown-flag": (["--models-dir", str(tmp_path), "--no-such-flag"], "unknown option"),
        "directory-as-preset": (["--models-preset", str(tmp_path)], "preset file"),
        # click's own usage errors: one line too, not the usage and a hint around it
        "missing-keys-file": (["--models-dir", str(tmp_path), "--api-key-file", str(tmp_path / "nope")],
                              "does not exist"),
        "bad-port": (["--models-dir", str(tmp_path), "--port", "99999"], "--port"),
        "load-timeout-flag": (["--models-dir", str(tmp_path), "--load-timeout", "soon"], "--load-timeout"),
        # llama-server's agent features: /tools and /cors-proxy would run commands and fetch URLs for any caller
        "tools-flag": (["--models-dir", str(tmp_path), "--tools", "all"], "--tools is not offered by modelyard"),
        "agent-env": (["--models-dir", str(tmp_path)], "LLAMA_ARG_AGENT is not offered by modelyard"),
        "api-prefix": (["--models-dir", str(tmp_path), "--api-prefix", "/llm/"], "without the trailing slash"),
    }
    preset.write_text({"bad-preset": "[m\n", "preset-keep-alive": f"[m]\nmodel = {gguf}\nkeep-alive = nan\n"}
                      .get(case, ""))
    args, expected = cases[case]
    result = _serve("--llama-server", str(fake_server), *args, env={"agent-env": {"LLAMA_ARG_AGENT": "on"}}.get(case))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr


# --- with the real engine ----------------------------------------------------------------------------------------

def test_real_engine_embeddings_refused_and_keep_alive_end_to_end(start_router: Callable[..., Any],
                                                                  models_dir: Path) -> None:
    router = start_router("--models-dir", str(models_dir))
    client: httpx.Client = router.client
    for path in ("/v1/embeddings", "/api/embed"):
        reply = client.post(path, json={"model": "smol", "input": "hello"})
        assert reply.status_code == 400 and "`embeddings = true`" in reply.text, reply.text
    assert router.children() == []  # refused before any load
    for value in ("inf", "nan", 1e20):
        reply = client.post("/api/generate", json={"model": "smol", "prompt": "x", "keep_alive": value})
        assert reply.status_code == 400 and "keep_alive" in reply.json()["error"]
    loaded = client.post("/api/generate", json={"model": "smol", "keep_alive": "87600h"})
    assert loaded.status_code == 200, loaded.text
    for path in ("/api/ps", "/models", "/api/tags"):
        reply = client.get(path)
        assert reply.status_code == 200, (path, reply.text)
        strict_loads(reply.text)
    running = client.get("/api/ps").json()["models"]
    assert [m["name"] for m in running] == ["smol:latest"] and running[0]["expires_at"] > "2030"
