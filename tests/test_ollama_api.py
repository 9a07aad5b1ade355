"""Ollama's listing endpoints, through the official `ollama` Python client, with the real engine and models."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import Router

ARGS = ("--keep-alive", "5m")


@pytest.fixture
def router(models_dir: Path, start_router: Any) -> Router:
    """A router of its own, for a test that needs nothing loaded, or counts loads, or kills a child."""
    started: Router = start_router("--models-dir", str(models_dir), *ARGS)
    return started


@pytest.fixture(scope="module")
def shared(module_models_dir: Path, start_module_router: Any) -> Router:
    """One router for the tests that work whatever is loaded and leave nothing another test would notice."""
    started: Router = start_module_router("--models-dir", str(module_models_dir), *ARGS)
    return started


def test_version_and_root(shared: Router) -> None:
    version = shared.client.get("/api/version")
    assert version.headers["content-type"].startswith("application/json")
    major, minor, patch = version.json()["version"].split(".")
    assert all(part.isdigit() for part in (major, minor, patch))
    assert shared.client.get("/").text == "Ollama is running"
    assert shared.client.head("/api/version").status_code == 200
    assert shared.client.head("/api/tags").status_code == 200


def wait_for_metadata(client: ollama.Client) -> dict[str, Any]:
    """Digests and GGUF details are computed in the background; the listing never waits for them."""
    deadline = time.monotonic() + 60
    while True:
        models = {m.model: m for m in client.list().models}
        if all(m.digest and m.details and m.details.family for m in models.values()):
            return models
        assert time.monotonic() < deadline, models
        time.sleep(0.2)


def test_list_with_tagged_names_details_and_digest(shared: Router) -> None:
    models = wait_for_metadata(ollama.Client(host=shared.url))
    assert set(models) == {"smol:latest", "smol-b:latest", "gemma:latest"}
    gemma = models["gemma:latest"]
    assert gemma.size == 253_113_024 and len(gemma.digest or "") == 64
    assert gemma.details is not None
    assert gemma.details.family == "gemma3" and gemma.details.quantization_level == "Q4_K_M"
    assert gemma.details.parameter_size == "270M" and gemma.details.format == "gguf"
    assert models["smol:latest"].digest == models["smol-b:latest"].digest  # the same file


def test_ps_shows_loaded_models_with_expiry(router: Router) -> None:
    client = ollama.Client(host=router.url)
    assert client.ps().models == []
    wait_for_metadata(client)
    router.client.post("/v1/chat/completions", json={"model": "gemma:latest", "messages": [],
                                                     "max_tokens": 1}).raise_for_status()
    running = client.ps().models
    assert [m.model for m in running] == ["gemma:latest"]
    entry = running[0]
    assert entry.size and entry.size > 100_000_000 and entry.size_vram == 0
    assert entry.expires_at is not None
    expires_in = (entry.expires_at - datetime.now(entry.expires_at.tzinfo)).total_seconds()
    assert 200 < expires_in <= 300  # --keep-alive 5m, counted from the end of the request
    assert entry.context_length == 32768


def test_openai_model_by_id(shared: Router) -> None:
    for name in ("gemma", "gemma:latest"):
        entry = shared.client.get(f"/v1/models/{name}").json()
        assert entry["id"] == "gemma" and entry["object"] == "model"
    missing = shared.client.get("/v1/models/nope")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/pull"), ("POST", "/api/create"),
                                              ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                                              ("POST", "/api/push"), ("POST", "/api/blobs/sha256:00")])
def test_model_management_endpoints_answer_a_clear_error(shared: Router, method: str, path: str) -> None:
    reply = shared.client.request(method, path, json={"model": "gemma"})
    assert reply.status_code == 400 and "modelyard" in reply.json()["error"]


def test_the_ollama_client_raises_the_error_text(shared: Router) -> None:
    with pytest.raises(ollama.ResponseError, match="--models-dir"):
        ollama.Client(host=shared.url).pull("gemma")
    assert httpx.get(shared.url + "/api/tags").headers["content-type"].startswith("application/json")


def test_chat_stream_and_not(shared: Router) -> None:
    client = ollama.Client(host=shared.url)
    reply = client.chat(model="smol", messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 8, "temperature": 0}, stream=False)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.done_reason in ("stop", "length")
    for field in ("prompt_eval_count", "eval_count", "total_duration", "load_duration", "eval_duration",
                  "prompt_eval_duration"):
        value = getattr(reply, field)
        assert isinstance(value, int) and value >= 0, field
    assert reply.eval_count and reply.eval_count > 0 and reply.total_duration and reply.total_duration > 0
    again = client.chat(model="smol", messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 8, "temperature": 0}, stream=False)
    assert again.prompt_eval_count == reply.prompt_eval_count  # the whole prompt, even from llama-server's cache

    chunks = list(client.chat(model="smol:latest", messages=[{"role": "user", "content": "Count to three."}],
                              options={"num_predict": 8}, stream=True))
    assert all(c.message.role == "assistant" for c in chunks)
    assert "".join(c.message.content or "" for c in chunks)
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert chunks[-1].eval_count and chunks[-1].eval_count > 0
    assert chunks[-1].prompt_eval_count and chunks[-1].prompt_eval_count > 10  # the system prompt is counted


def test_ndjson_framing(shared: Router) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 4}}
    with httpx.stream("POST", shared.url + "/api/chat", json=body, timeout=60) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = response.read().decode().split("\n")
    assert lines[-1] == "" and all(line.strip() for line in lines[:-1])  # no blank keep-alive lines


def test_generate_plain_and_raw(shared: Router) -> None:
    client = ollama.Client(host=shared.url)
    reply = client.generate(model="smol", prompt="Name a colour.", options={"num_predict": 6})
    assert reply.response and reply.done and reply.eval_count
    raw = client.generate(model="gemma", prompt="The capital of France is", raw=True,
                          options={"num_predict": 4, "temperature": 0})
    assert raw.done and raw.eval_count == 4 and raw.done_reason == "length"
    streamed = list(client.generate(model="gemma", prompt="One, two,", raw=True, stream=True,
                                    options={"num_predict": 4}))
    assert streamed[-1].done and "".join(s.response or "" for s in streamed[:-1])


def test_load_and_unload_through_keep_alive(router: Router) -> None:
    client = ollama.Client(host=router.url)
    loaded = client.generate(model="gemma")  # only a model: load it
    assert loaded.done and loaded.done_reason == "load"
    assert router.status("gemma") == "loaded"
    unloaded = httpx.post(router.url + "/api/generate", json={"model": "gemma", "keep_alive": 0}, timeout=30)
    assert unloaded.headers["content-type"].startswith("application/json")  # one object, not a stream
    assert unloaded.json()["done_reason"] == "unload"
    router.wait_status("gemma", "unloaded", timeout=10)
    assert client.chat(model="smol", messages=[]).done_reason == "load"


def test_allocation_options_never_reload(router: Router) -> None:
    client = ollama.Client(host=router.url)
    for num_ctx in (8192, 9001, 12345):
        client.generate(model="smol", prompt="Hi", options={"num_ctx": num_ctx, "num_predict": 1})
    assert router.log().count("loading smol:") == 1


def test_unknown_model_and_bad_requests_get_ollama_errors(shared: Router) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        ollama.Client(host=shared.url).chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 404 and error.value.error == "model 'nope' not found"
    bad = shared.client.post("/api/chat", content=b"{oops")
    assert bad.status_code == 400 and "invalid JSON" in bad.json()["error"]
    wrong = shared.client.post("/api/chat", json={"model": "smol", "messages": "hi"})
    assert wrong.status_code == 400 and "messages" in wrong.json()["error"]
    ka = shared.client.post("/api/generate", json={"model": "smol", "prompt": "x", "keep_alive": "soon"})
    assert ka.status_code == 400 and "keep_alive" in ka.json()["error"]



@pytest.mark.parametrize(("path", "extra", "message"), [
    ("/api/chat", {"tools": "x"}, "tools must be a list"),
    ("/api/chat", {"format": 5}, "format must be"),
    ("/api/chat", {"think": "very"}, "think must be"),
    ("/api/chat", {"options": [1]}, "options must be a JSON object"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": "abc"}]}, "images must be a list"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "cannot read images"),
    ("/api/generate", {"prompt": "x", "images": ["aGk="]}, "no projector"),
    ("/api/generate", {"prompt": "x", "suffix": 5}, "suffix must be a string"),
    ("/api/generate", {"prompt": 5}, "prompt must be a string"),
    ("/api/embed", {"input": [1, 2]}, "input must be a string or a list of strings"),
])
def test_wrong_types_are_400_saying_what_to_send(shared: Router, path: str, extra: dict[str, Any],
                                                 message: str) -> None:
    # smol-b: the one model no other test on the shared router loads
    body = {"model": "smol-b", "messages": [{"role": "user", "content": "hi"}], "stream": False, **extra}
    reply = shared.client.post(path, json=body)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    assert shared.status("smol-b") == "unloaded"  # refused before any load


def test_embed_and_legacy_embeddings(tmp_path: Path, demo_models: dict[str, Path], start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[embedder]\nmodel = {demo_models['gemma3-270m']}\nembeddings = true\npooling = mean\n")
    router: Router = start_router("--models-preset", str(preset))
    client = ollama.Client(host=router.url)
    result = client.embed(model="embedder", input=["hello", "world"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 640
    legacy = client.embeddings(model="embedder:latest", prompt="hello")
    assert len(legacy.embedding) == 640


def test_show_reports_the_serving_context(tmp_path: Path, demo_models: dict[str, Path], start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[chat]\nmodel = {demo_models['smollm2-135m-instruct']}\nc = 4096\n")
    router: Router = start_router("--models-preset", str(preset))
    client = ollama.Client(host=router.url)
    wait_for_metadata(client)
    shown = client.show("chat")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096  # what -c serves, not the trained 8192
    assert shown.parameters == "num_ctx 4096"
    assert shown.capabilities is not None and "completion" in shown.capabilities
    legacy = router.client.post("/api/show", json={"name": "chat:latest"})  # Continue and LiteLLM send `name`
    assert legacy.status_code == 200 and "model_info" in legacy.json()
    missing = router.client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"] == "model 'nope' not found"


def test_a_child_dying_mid_stream_ends_the_ndjson_with_an_error_line(router: Router) -> None:
    from tests.test_real_engine_e2e import _child_pid

    client = ollama.Client(host=router.url)
    client.generate(model="smol", prompt="warm", options={"num_predict": 1})
    pid = _child_pid(router, "smol")
    stream = client.chat(model="smol", messages=[{"role": "user", "content": "Tell me a long story."}],
                         options={"num_predict": 400}, stream=True)
    with pytest.raises(ollama.ResponseError, match="failed mid-stream"):
        for n, _ in enumerate(stream):
            if n == 2:
                os.kill(pid, signal.SIGKILL)
    router.wait_status("smol", "failed")
    assert client.generate(model="smol", prompt="again", options={"num_predict": 1}).done  # reloaded
