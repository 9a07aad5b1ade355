"""Ollama's listing endpoints, through the official `ollama` Python client, with the real engine and models."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import Router


@pytest.fixture
def router(models_dir: Path, start_router: Any) -> Router:
    started: Router = start_router("--models-dir", str(models_dir), "--keep-alive", "5m")
    return started


def test_version_and_root(router: Router) -> None:
    version = router.client.get("/api/version")
    assert version.headers["content-type"].startswith("application/json")
    major, minor, patch = version.json()["version"].split(".")
    assert all(part.isdigit() for part in (major, minor, patch))
    assert router.client.get("/").text == "Ollama is running"
    assert router.client.head("/api/version").status_code == 200
    assert router.client.head("/api/tags").status_code == 200


def wait_for_metadata(client: ollama.Client) -> dict[str, Any]:
    """Digests and GGUF details are computed in the background; the listing never waits for them."""
    deadline = time.monotonic() + 60
    while True:
        models = {m.model: m for m in client.list().models}
        if all(m.digest and m.details and m.details.family for m in models.values()):
            return models
        assert time.monotonic() < deadline, models
        time.sleep(0.2)


def test_list_with_tagged_names_details_and_digest(router: Router) -> None:
    models = wait_for_metadata(ollama.Client(host=router.url))
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


def test_openai_model_by_id(router: Router) -> None:
    for name in ("gemma", "gemma:latest"):
        entry = router.client.get(f"/v1/models/{name}").json()
        assert entry["id"] == "gemma" and entry["object"] == "model"
    missing = router.client.get("/v1/models/nope")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/pull"), ("POST", "/api/create"),
                                              ("POST", "/api/copy"), ("DELETE", "/api/delete"),
                                              ("POST", "/api/push"), ("POST", "/api/blobs/sha256:00")])
def test_model_management_endpoints_answer_a_clear_error(router: Router, method: str, path: str) -> None:
    reply = router.client.request(method, path, json={"model": "gemma"})
    assert reply.status_code == 400 and "modelyard" in reply.json()["error"]


def test_the_ollama_client_raises_the_error_text(router: Router) -> None:
    with pytest.raises(ollama.ResponseError, match="--models-dir"):
        ollama.Client(host=router.url).pull("gemma")
    assert httpx.get(router.url + "/api/tags").headers["content-type"].startswith("application/json")
