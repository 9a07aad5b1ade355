"""The HTTP surface: error envelopes, API key, CORS, router props, listings that never wait, CLI refusals."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.api.cors import CorsPolicy
from tests.conftest import Router, fake_cmd


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, start_module_router: Any) -> Router:
    """One router for the module: its tests only read, or load a model that no other test needs unloaded."""
    preset = tmp_path_factory.mktemp("fleet") / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\nalias = first\n[slow]\ncmd = {fake_cmd('slow', 3.0)}\n")
    started: Router = start_module_router("--models-preset", str(preset))
    return started


def assert_error(response: httpx.Response, status: int, code: str, text: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and text in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_get_openai_error_envelopes(router: Router) -> None:
    post = router.client.post
    assert_error(post("/v1/chat/completions", json={"messages": []}), 400, "model_missing", "model name is missing")
    assert_error(post("/v1/chat/completions", json={"model": "nope"}), 404, "model_not_found", "model 'nope' not found")
    assert_error(post("/v1/chat/completions", content=b"{not json"), 400, "invalid_request", "not valid JSON")
    assert_error(post("/v1/chat/completions", json=["a"]), 400, "invalid_request", "JSON object")
    assert_error(post("/v1/chat/completions", json={"model": 7}), 400, "invalid_request", "must be a string")
    assert_error(router.client.get("/v1/nothing-here"), 404, "not_found", "unknown endpoint")
    assert_error(router.client.get("/v1/chat/completions"), 405, "method_not_allowed", "use POST")
    assert_error(router.client.get("/slots"), 400, "model_missing", "?model=")
    assert_error(post("/models/load", json={"model": "nope"}), 404, "model_not_found", "not found")


def test_aliases_route_to_the_model(router: Router) -> None:
    response = router.client.post("/v1/chat/completions", json={"model": "first", "messages": []})
    assert response.status_code == 200 and response.json()["served_by"] == "a"


def test_listings_answer_at_once_while_a_model_loads(router: Router) -> None:
    """clients.md 7.8: Open WebUI gives listings 10 s, then counts the server as down."""
    router.client.post("/models/load", json={"model": "slow"}).raise_for_status()
    router.wait_status("slow", "loading", timeout=5)
    for path in ("/v1/models", "/models", "/health", "/props", "/api/tags", "/api/ps", "/api/version"):
        started = time.monotonic()
        assert router.client.get(path).status_code == 200
        assert time.monotonic() - started < 0.5, path
    assert router.status("slow") == "loading"


def test_router_props(router: Router) -> None:
    props = router.client.get("/props").json()
    assert props["role"] == "router" and props["max_instances"] == 4 and props["models_autoload"] is True
    assert "build_info" in props and props["default_generation_settings"]["n_ctx"] == 0


def test_paths_with_doubled_or_trailing_slashes_are_served(router: Router) -> None:
    """clients.md 7.9: Open WebUI builds f"{url}/api/tags", so a base URL ending in / gives //api/tags."""
    for path in ("//api/tags", "/api/tags/", "/v1/models/", "//v1//models", "/models/"):
        reply = router.client.get(router.url + path)  # a full URL: httpx reads a leading // as a host
        assert reply.status_code == 200 and "application/json" in reply.headers["content-type"], path
    for path in ("//v1/chat/completions", "/v1/chat/completions/", "//v1//chat/completions/"):
        reply = router.client.post(router.url + path, json={"model": "a", "messages": []})
        assert reply.status_code == 200 and reply.json()["served_by"] == "a", path
    assert router.client.get(router.url + "//v1/models/first/").json()["id"] == "a"
    assert_error(router.client.get(router.url + "//v1/nothing-here/"), 404, "not_found", "unknown endpoint")


@pytest.mark.parametrize(("setting", "ollama_origins", "allowed", "refused"), [
    (None, "", ["http://localhost", "http://localhost:5173", "https://127.0.0.1:8443", "http://0.0.0.0:3000",
                "app://obsidian.md", "tauri://localhost", "vscode-webview://abc", "file://"],
     ["https://evil.example", "http://localhost.evil.example", "http://192.168.1.5:3000"]),
    (None, "https://chat.example,http://*.lan:*", ["http://localhost:3000", "https://chat.example", "http://box.lan:80"],
     ["https://chat.example.evil", "http://box.lan"]),
    ("*", "", ["https://anything.example", "http://localhost"], []),
    ("localhost", "", ["http://localhost:3000", "http://[::1]:80", "http://app.localhost"], ["http://0.0.0.0:3000"]),
    ("https://a.example, https://b.example", "", ["https://b.example"], ["http://localhost:3000"]),
])
def test_cors_policy(setting: str | None, ollama_origins: str, allowed: list[str], refused: list[str]) -> None:
    policy = CorsPolicy.from_settings(setting, ollama_origins)
    assert all(policy.allows(origin) for origin in allowed)
    assert not any(policy.allows(origin) for origin in refused)


def test_cors_defaults_are_ollama_s_and_ollama_origins_adds(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    router: Router = start_router("--models-preset", str(preset), env={"OLLAMA_ORIGINS": "https://chat.example"})
    for origin, allowed in (("http://localhost:8080", True), ("https://chat.example", True),
                            ("https://evil.example", False)):
        reply = router.client.get("/api/tags", headers={"Origin": origin})
        assert reply.status_code == (200 if allowed else 403), origin  # a foreign page is refused outright
        assert reply.headers.get("access-control-allow-origin") == (origin if allowed else None), origin
    everyone: Router = start_router("--models-preset", str(preset), "--cors-origins", "*")
    reply = everyone.client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert reply.headers["access-control-allow-origin"] == "https://evil.example"  # router mode's default


def test_cors_preflight_and_headers(router: Router) -> None:
    origin = "http://localhost:5173"
    preflight = router.client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization,content-type"
    listing = router.client.get("/v1/models", headers={"Origin": origin})
    assert listing.headers["access-control-allow-origin"] == origin


def test_api_key(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    router: Router = start_router("--models-preset", str(preset), "--api-key", "k1,k2")
    denied = router.client.get("/v1/models")
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert router.client.get("/health").status_code == 200
    assert router.client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert router.client.get("/v1/models", headers={"X-Api-Key": "k1"}).status_code == 200
    assert router.client.options("/v1/models", headers={"Origin": "http://localhost"}).status_code == 204


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelyard.cli", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("ini", "message"), [
    ("[m]\nmodel = {gguf}\nctx = 5\n", "models.ini:3: option 'ctx' not recognized in preset [m]"),
    ("[m]\nthreads = 2\n", "models.ini:1 [m]: model 'm' has no model source"),
    ("[m]\nmodel = {missing}\n", "models.ini:2 [m]: model file '{missing}' does not exist"),
    ("[m]\nmodel = {gguf}\n[n]\nmodel = {gguf}\nalias = m\n", "name 'm' is already used by"),
])
def test_bad_presets_are_refused_at_start(tmp_path: Path, ini: str, message: str) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    missing = tmp_path / "missing.gguf"
    preset = tmp_path / "models.ini"
    preset.write_text(ini.format(gguf=gguf, missing=missing))
    result = run_serve("--models-preset", str(preset))
    assert result.returncode != 0
    assert message.format(missing=missing) in result.stderr


def test_unknown_engine_flag_is_refused(tmp_path: Path) -> None:
    result = run_serve("--models-dir", str(tmp_path), "--no-such-flag")
    assert result.returncode != 0 and "unknown option '--no-such-flag'" in result.stderr


def test_engine_flags_become_defaults_for_every_model(tmp_path: Path, start_router: Any) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    preset = tmp_path / "models.ini"
    preset.write_text(f"[*]\nc = 100\n[m]\nmodel = {gguf}\nthreads = 1\n")
    router: Router = start_router("--models-preset", str(preset), "-c", "4096", "--no-jinja")
    text = router.client.get("/models").json()["data"][0]["status"]["preset"]
    assert "ctx-size = 4096" in text and "jinja = false" in text and "threads = 1" in text


def test_api_key_file_and_cors_origins_localhost(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsecret-1\n\nsecret-2\n")
    router: Router = start_router("--models-preset", str(preset), "--api-key-file", str(keys),
                                  "--cors-origins", "localhost")
    auth = {"Authorization": "Bearer secret-2"}
    assert router.client.get("/v1/models").status_code == 401
    local = router.client.get("/v1/models", headers={**auth, "Origin": "http://localhost:3000"})
    assert local.status_code == 200 and local.headers["access-control-allow-origin"] == "http://localhost:3000"
    remote = router.client.get("/v1/models", headers={**auth, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in remote.headers


def test_https(tmp_path: Path, start_router: Any) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    preset = tmp_path / "fleet.ini"
    preset.write_text(f"[a]\ncmd = {fake_cmd('a')}\n")
    router: Router = start_router("--models-preset", str(preset), "--ssl-key-file", str(key),
                                  "--ssl-cert-file", str(cert), wait=False)
    url = router.url.replace("http://", "https://")
    deadline = time.monotonic() + 20
    while True:
        try:
            response = httpx.get(url + "/health", verify=False)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, router.log()
            time.sleep(0.05)
    assert response.status_code == 200


@pytest.mark.parametrize("cmd", ["", "python3 -c \"print(1)"])
def test_an_unusable_cmd_is_refused_at_start(tmp_path: Path, cmd: str) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[broken]\ncmd = {cmd}\n")
    result = run_serve("--models-preset", str(preset))
    assert result.returncode != 0 and "models.ini:2 [broken]: cmd" in result.stderr
