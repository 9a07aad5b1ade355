"""End to end with the real llama-server and the real demo models, through the official openai client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Router

SMALL = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def shared(module_models_dir: Path, start_module_router: Any) -> Router:
    """One router for the tests that need no fresh one: each leaves every model it uses loaded or reloadable,
    and none but the load-counting test touches smol-b."""
    started: Router = start_module_router("--models-dir", str(module_models_dir))
    return started


def loaded_children(router: Router) -> int:
    """How many models /models shows loaded (one child each, if no process is left over)."""
    return sum(1 for m in router.client.get("/models").json()["data"] if m["status"]["value"] == "loaded")


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


def test_chat_stream_and_not_with_the_openai_client(shared: Router) -> None:
    router = shared
    api = client(router)
    ids = {m.id for m in api.models.list().data}
    assert ids == {"smol", "smol-b", "gemma"}

    reply = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hello."}],
                                        **SMALL)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    stream = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Count to five."}],
                                         stream=True, stream_options={"include_usage": True}, **SMALL)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len(chunks) > 2
    assert chunks[-1].usage is not None  # the usage chunk passes through


def test_completions_and_switching_between_models(shared: Router) -> None:
    router = shared
    api = client(router)
    for model in ("gemma", "smol", "gemma"):
        completion = api.completions.create(model=model, prompt="The capital of France is", **SMALL)
        assert completion.choices[0].text is not None and completion.usage is not None
        assert completion.usage.completion_tokens > 0
    assert router.status("gemma") == "loaded" and router.status("smol") == "loaded"
    assert len(router.children()) == loaded_children(router)  # one process per loaded model, none more


def test_embeddings_where_the_preset_enables_them(tmp_path: Path, demo_models: dict[str, Path],
                                                  start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[embedder]\nmodel = {demo_models['gemma3-270m']}\nembeddings = true\npooling = mean\n")
    router: Router = start_router("--models-preset", str(preset))
    api = client(router)
    result = api.embeddings.create(model="embedder", input=["hello world", "goodbye"])  # base64 by default
    assert len(result.data) == 2 and len(result.data[0].embedding) == 640
    raw = router.client.post("/v1/embeddings", json={"model": "embedder", "input": "hi",
                                                     "encoding_format": "base64"}).json()
    vector = base64.b64decode(raw["data"][0]["embedding"])
    assert len(struct.unpack(f"{len(vector) // 4}f", vector)) == 640


def test_models_max_one_evicts_the_least_recently_used(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir), "--models-max", "1")
    api = client(router)
    api.completions.create(model="smol", prompt="a", **SMALL)
    api.completions.create(model="gemma", prompt="b", **SMALL)
    assert router.status("smol") == "unloaded" and router.status("gemma") == "loaded"
    assert len(router.children()) == 1


def test_busy_model_survives_a_request_for_another(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir), "--models-max", "1")
    api = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)

    async def scenario() -> tuple[Any, Any]:
        await api.completions.create(model="smol", prompt="warm up", **SMALL)
        long = asyncio.create_task(api.completions.create(model="smol", prompt="Once upon a time",
                                                          max_tokens=120, temperature=0))
        await asyncio.sleep(0.3)
        other = await api.completions.create(model="smol-b", prompt="Hello", **SMALL)
        return await long, other

    long, other = asyncio.run(scenario())
    assert long.usage.completion_tokens == 120  # not cut short by an eviction
    assert other.choices[0].text is not None


def test_concurrent_requests_for_an_unloaded_model_cause_one_load(shared: Router) -> None:
    router = shared
    assert router.status("smol-b") == "unloaded"  # no other test on the shared router uses it
    api = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(api.completions.create(model="smol-b", prompt=f"n{i}", **SMALL)
                                      for i in range(4)))

    assert len(asyncio.run(burst())) == 4
    assert router.log().count("loading smol-b:") == 1
    assert len(router.children()) == loaded_children(router)


def test_unload_and_reload_of_sources(tmp_path: Path, demo_models: dict[str, Path], start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    smol = demo_models["smollm2-135m-instruct"]
    preset.write_text(f"[keep]\nmodel = {smol}\n[change]\nmodel = {smol}\nc = 512\n[drop]\nmodel = {smol}\n")
    router: Router = start_router("--models-preset", str(preset))
    for name in ("keep", "change", "drop"):
        router.client.post("/completion", json={"model": name, "prompt": "x", "n_predict": 1}).raise_for_status()
    keep_pid = _child_pid(router, "keep")

    assert router.client.post("/models/unload", json={"model": "keep"}).json() == {"success": True}
    router.wait_status("keep", "unloaded")
    router.client.post("/completion", json={"model": "keep", "prompt": "x", "n_predict": 1}).raise_for_status()
    assert _child_pid(router, "keep") != keep_pid

    preset.write_text(f"[keep]\nmodel = {smol}\n[change]\nmodel = {smol}\nc = 1024\n[new]\nmodel = {smol}\n")
    listing = router.client.get("/models?reload=1").json()["data"]
    assert {m["id"] for m in listing} == {"keep", "change", "new"}
    router.wait_status("change", "unloaded")  # restarted on next use with the new arguments
    assert router.status("keep") == "loaded"
    router.client.post("/completion", json={"model": "change", "prompt": "x", "n_predict": 1}).raise_for_status()
    args = next(m for m in router.client.get("/models").json()["data"] if m["id"] == "change")["status"]["args"]
    assert args[args.index("--ctx-size") + 1] == "1024"
    gone = router.client.post("/completion", json={"model": "drop", "prompt": "x"})
    assert gone.status_code == 404


def _child_pid(router: Router, model: str) -> int:
    for pid in router.children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--alias" in cmdline and cmdline[cmdline.index(b"--alias") + 1] == model.encode():
            return pid
    raise AssertionError(f"no child for {model}")


def test_child_killed_mid_stream_gives_an_error_and_the_next_request_recovers(models_dir: Path,
                                                                             start_router: Any) -> None:
    # A router of its own, as before the module shared one: on the shared router the stream once ended
    # cleanly despite the kill (DID NOT RAISE) in a clean-clone run.
    router: Router = start_router("--models-dir", str(models_dir))
    api = client(router)
    api.completions.create(model="smol", prompt="warm", **SMALL)
    pid = _child_pid(router, "smol")
    # ignore_eos: a story that ended within a few tokens was already sent whole (to [DONE]) when the kill
    # landed, and the stream ended cleanly: the "DID NOT RAISE" seen in clean-clone runs
    stream = api.completions.create(model="smol", prompt="Tell me a long story", max_tokens=400, stream=True,
                                    extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for n, _ in enumerate(stream):
            if n == 2:
                os.kill(pid, signal.SIGKILL)
    router.wait_status("smol", "failed")
    again = api.completions.create(model="smol", prompt="again", **SMALL)
    assert again.choices[0].text is not None
    assert _child_pid(router, "smol") != pid


def test_router_killed_with_sigkill_leaves_no_child(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir))
    router.client.post("/completion", json={"model": "smol", "prompt": "x", "n_predict": 1}).raise_for_status()
    children = router.children()
    assert len(children) == 1
    router.proc.kill()
    router.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.05)
    alive = [pid for pid in children if Path(f"/proc/{pid}/stat").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []


def test_client_disconnect_mid_stream_frees_the_slot(tmp_path: Path, demo_models: dict[str, Path],
                                                     start_router: Any) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(f"[one-slot]\nmodel = {demo_models['smollm2-135m-instruct']}\nparallel = 1\n")
    router: Router = start_router("--models-preset", str(preset))
    body = {"model": "one-slot", "prompt": "Write a very long story", "n_predict": 2000, "stream": True}
    with httpx.stream("POST", router.url + "/completion", json=body, timeout=60) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n == 3:
                break  # the client goes away mid-stream
    # 2,000 tokens take this model 20-36 s here (56-100 tokens/s), so a slot still busy 10 s later kept
    # generating; 5 s was once too short for llama-server to notice the closed connection in a loaded make test
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        slots = router.client.get("/slots?model=one-slot").json()
        if not any(slot["is_processing"] for slot in slots):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the slot kept generating after the client left")
    started = time.monotonic()
    router.client.post("/completion", json={"model": "one-slot", "prompt": "x", "n_predict": 2}).raise_for_status()
    assert time.monotonic() - started < 5


def test_a_model_that_cannot_load_fails_with_the_engine_s_own_words(tmp_path: Path, start_router: Any) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "corrupt.gguf").write_bytes(b"this is not a gguf file")
    router: Router = start_router("--models-dir", str(models))
    response = router.client.post("/v1/chat/completions", json={"model": "corrupt", "messages": []})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "failed to load" in message and "llama-server exited with code 1" in message
    assert "gguf" in message.lower()
    status = router.client.get("/models").json()["data"][0]["status"]
    assert status["value"] == "failed" and status["exit_code"] == 1


def test_requests_right_after_a_stream_are_not_sent_on_a_closed_connection(shared: Router) -> None:
    """llama-server closes the connection after a streamed answer without saying so; a request sent on it
    would fail with "Server disconnected"."""
    router = shared
    body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with httpx.Client(base_url=router.url, timeout=60) as http:
        for _ in range(15):
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
                assert streamed.status_code == 200 and b"[DONE]" in streamed.read()
            plain = http.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200, plain.text
            ollama_plain = http.post("/api/chat", json={"model": "smol", "messages": body["messages"],
                                                        "stream": False, "options": {"num_predict": 2}})
            assert ollama_plain.status_code == 200, ollama_plain.text


def test_the_child_client_never_reuses_a_connection_after_a_stream(models_dir: Path, start_router: Any) -> None:
    """The same, deterministically, on the pooled client modelyard keeps per child (childhttp.ChildClient), over
    the child's Unix socket: a plain aiohttp session sent straight after a stream fails every time on this
    llama-server (on a socket as over TCP); modelyard's never does, and its streams after the first go out on
    the spare connection it opened as the previous stream's went."""
    import aiohttp

    from modelyard.childhttp import ChildClient, ChildHTTPError

    # A router of its own, as before the module shared one: on the shared router one of the ten requests of
    # modelyard's own session failed once in a clean-clone run (cause not found yet; see the closing note).
    router: Router = start_router("--models-dir", str(models_dir))
    client(router).completions.create(model="smol", prompt="warm", **SMALL)
    socket_path = router.endpoint("smol").socket
    assert socket_path is not None
    path = "/v1/chat/completions"
    child = _child_pid(router, "smol")
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    key = next(e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"LLAMA_API_KEY="))
    auth = {"Authorization": f"Bearer {key}"}  # the child answers only modelyard, which holds its key

    def body(i: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": i % 2 == 0}

    async def ours() -> int:
        failed = 0
        pool = ChildClient(socket_path)
        try:
            for i in range(10):
                try:
                    reply = await pool.request("POST", path, body=json.dumps(body(i)).encode(),
                                               headers={**auth, "Content-Type": "application/json"})
                    await reply.read()
                    reply.release()
                    assert reply.status == 200
                except ChildHTTPError:
                    failed += 1
        finally:
            await pool.close()
        return failed

    async def plain() -> int:
        failed = 0
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(socket_path))) as session:
            for i in range(10):
                try:
                    async with session.post("http://localhost" + path, json=body(i), headers=auth) as reply:
                        await reply.read()
                        assert reply.status == 200
                except aiohttp.ClientError:
                    failed += 1
        return failed

    async def both() -> tuple[int, int]:
        return await ours(), await plain()

    ours_failed, plain_failed = asyncio.run(both())
    assert ours_failed == 0
    assert plain_failed > 0  # the engine's behaviour this works around; if it ever passes, the workaround can go
