"""What the clients in clients.md read, checked against the real engine and models: golden shapes of every
response (fields and types) and one test per quirk of its section 7 ("Compatibility details most likely to be
missed"; numbers below refer to it). Two quirks are covered elsewhere: listings that answer while a model
loads (7.8, test_api.test_listings_answer_at_once_while_a_model_loads) and per-request num_ctx never reloading
(7.4, test_ollama_api.test_allocation_options_never_reload); asynchronous load/unload with status (7.13) is
in test_fake_engine_e2e."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import Router, fake_cmd

TEMPLATE = Path(__file__).parent / "data" / "tools-thinking-chat-template.jinja"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Path:
    """SmolLM2 with a Hermes-style chat template that renders tools and opens a <think> block when asked to,
    and with FIM token ids: the same weights, so the tool-call, thinking and fill-in-the-middle paths run on
    the real engine (the demo models have none of them)."""
    path = tmp_path_factory.mktemp("tools") / "smol-tools.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force",
                    "--chat-template-file", str(TEMPLATE), "--special-token-by-id", "fim_pre", "3",
                    "--special-token-by-id", "fim_suf", "4", "--special-token-by-id", "fim_mid", "5",
                    str(demo_models["smollm2-135m-instruct"]), str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path],
           tools_model: Path) -> Iterator[Router]:
    directory = tmp_path_factory.mktemp("clients")
    preset = directory / "models.ini"
    preset.write_text(f"[*]\nc = 2048\n[smol]\nmodel = {demo_models['smollm2-135m-instruct']}\n"
                      f"[gemma]\nmodel = {demo_models['gemma3-270m']}\n[tools]\nmodel = {tools_model}\n"
                      f"[embedder]\nmodel = {demo_models['gemma3-270m']}\nembeddings = true\npooling = mean\n"
                      f"[fake]\ncmd = {fake_cmd('fake')}\n")
    started = Router(["--models-preset", str(preset), "--keep-alive", "5m"], directory).wait_ready()
    deadline = time.monotonic() + 60
    while not all(m["details"]["family"] and m["digest"] for m in started.client.get("/api/tags").json()["models"]
                  if m["name"] != "fake:latest"):
        assert time.monotonic() < deadline, "GGUF metadata never read"
        time.sleep(0.1)
    yield started
    started.stop()


# --- golden shapes --------------------------------------------------------------------------------------

def assert_shape(value: Any, shape: Any, where: str = "$") -> None:
    """`shape` is a type, a tuple of types, a dict of required keys (extra keys allowed), or [item shape]."""
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        for key, inner in shape.items():
            assert key in value, f"{where}.{key} missing in {sorted(value)}"
            assert_shape(value[key], inner, f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            assert_shape(item, shape[0], f"{where}[{i}]")
    else:
        assert isinstance(value, shape) and not (isinstance(value, bool) and shape in (int, float)), \
            f"{where}: {value!r} is not {shape}"


TIMES = {"total_duration": int, "load_duration": int, "prompt_eval_count": int, "prompt_eval_duration": int,
         "eval_count": int, "eval_duration": int}
DETAILS = {"parent_model": str, "format": str, "family": str, "families": [str], "parameter_size": str,
           "quantization_level": str}
SHAPES: dict[str, Any] = {
    "version": {"version": str},
    "tags": {"models": [{"name": str, "model": str, "modified_at": str, "size": int, "digest": str,
                         "details": DETAILS}]},
    "ps": {"models": [{"name": str, "model": str, "size": int, "size_vram": int, "digest": str,
                       "details": DETAILS, "expires_at": str, "context_length": int}]},
    "show": {"model_info": dict, "details": DETAILS, "parameters": str, "template": str,
             "capabilities": [str], "modified_at": str, "modelfile": str},
    "chat_line": {"model": str, "created_at": str, "message": {"role": str, "content": str}, "done": bool},
    "chat_final": {"model": str, "created_at": str, "message": {"role": str, "content": str}, "done": bool,
                   "done_reason": str, **TIMES},
    "generate_line": {"model": str, "created_at": str, "response": str, "done": bool},
    "generate_final": {"model": str, "created_at": str, "response": str, "done": bool, "done_reason": str,
                       **TIMES},
    "lifecycle": {"model": str, "created_at": str, "done": bool, "done_reason": str},
    "embed": {"model": str, "embeddings": [[float]], "total_duration": int, "load_duration": int,
              "prompt_eval_count": int},
    "embeddings": {"embedding": [float]},
    "ollama_error": {"error": str},
    "models": {"object": str, "data": [{"id": str, "object": str, "created": int, "owned_by": str,
                                        "status": {"value": str}}]},
    "model": {"id": str, "object": str, "created": int, "owned_by": str},
    "completion": {"id": str, "object": str, "created": int, "model": str,
                   "choices": [{"index": int, "message": {"role": str, "content": str}, "finish_reason": str}],
                   "usage": {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}},
    "chunk": {"id": str, "object": str, "created": int, "model": str,
              "choices": [{"index": int, "delta": dict}]},
    "usage_chunk": {"choices": [], "usage": {"prompt_tokens": int, "completion_tokens": int}},
    "openai_embeddings": {"object": str, "data": [{"object": str, "index": int, "embedding": (list, str)}],
                          "model": str, "usage": dict},
    "openai_error": {"error": {"message": str, "type": str, "param": (str, type(None)),
                               "code": (str, int, type(None))}},
}
HI = [{"role": "user", "content": "Hi"}]


def ndjson(router: Router, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[str]]:
    with httpx.stream("POST", router.url + path, json=body, timeout=120) as response:
        return response.headers, response.read().decode().split("\n")


def sse_events(router: Router, body: dict[str, Any]) -> tuple[httpx.Headers, list[str]]:
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.read().decode().split("\n")
    return response.headers, [line[6:] for line in lines if line.startswith("data: ")]


def test_ollama_shapes(router: Router) -> None:
    get, post = router.client.get, router.client.post
    assert_shape(get("/api/version").json(), SHAPES["version"])
    assert_shape(get("/api/tags").json(), SHAPES["tags"])
    assert_shape(post("/api/show", json={"model": "smol"}).json(), SHAPES["show"])
    assert_shape(post("/api/generate", json={"model": "smol"}).json(), SHAPES["lifecycle"])
    assert_shape(get("/api/ps").json(), SHAPES["ps"])
    small = {"num_predict": 4, "temperature": 0}
    assert_shape(post("/api/chat", json={"model": "smol", "messages": HI, "stream": False, "options": small}).json(),
                 SHAPES["chat_final"])
    _, lines = ndjson(router, "/api/chat", {"model": "smol", "messages": HI, "options": small})
    for line in lines[:-2]:
        assert_shape(json.loads(line), SHAPES["chat_line"])
    assert_shape(json.loads(lines[-2]), SHAPES["chat_final"])
    assert_shape(post("/api/generate", json={"model": "smol", "prompt": "Hi", "stream": False,
                                             "options": small}).json(), SHAPES["generate_final"])
    _, lines = ndjson(router, "/api/generate", {"model": "smol", "prompt": "Hi", "options": small})
    for line in lines[:-2]:
        assert_shape(json.loads(line), SHAPES["generate_line"])
    assert_shape(json.loads(lines[-2]), SHAPES["generate_final"])
    assert_shape(post("/api/embed", json={"model": "embedder", "input": ["a", "b"]}).json(), SHAPES["embed"])
    assert_shape(post("/api/embeddings", json={"model": "embedder", "prompt": "a"}).json(), SHAPES["embeddings"])
    for bad in (post("/api/chat", json={"model": "nope", "messages": HI}), post("/api/chat", content=b"{"),
                post("/api/pull", json={"model": "x"})):
        assert bad.status_code in (400, 404)
        assert_shape(bad.json(), SHAPES["ollama_error"])


def test_openai_shapes(router: Router) -> None:
    get, post = router.client.get, router.client.post
    assert_shape(get("/v1/models").json(), SHAPES["models"])
    assert_shape(get("/models").json(), SHAPES["models"])
    assert_shape(get("/v1/models/smol").json(), SHAPES["model"])
    assert_shape(post("/v1/chat/completions", json={"model": "smol", "messages": HI, "max_tokens": 4}).json(),
                 SHAPES["completion"])
    _, events = sse_events(router, {"model": "smol", "messages": HI, "max_tokens": 4, "stream": True})
    for event in events[:-1]:
        assert_shape(json.loads(event), SHAPES["chunk"])
    for encoding in ("float", "base64"):
        assert_shape(post("/v1/embeddings", json={"model": "embedder", "input": "a",
                                                  "encoding_format": encoding}).json(), SHAPES["openai_embeddings"])
    for bad in (post("/v1/chat/completions", json={"model": "nope"}), post("/v1/chat/completions", content=b"{"),
                get("/v1/nothing")):
        assert_shape(bad.json(), SHAPES["openai_error"])


# --- clients.md section 7, one test per quirk -------------------------------------------------------------

def test_7_1_x_x_latest_and_the_listed_id_name_one_model_everywhere(router: Router) -> None:
    tags = {m["name"] for m in router.client.get("/api/tags").json()["models"]}
    assert tags == {"smol:latest", "gemma:latest", "tools:latest", "embedder:latest", "fake:latest"}
    assert all(m["name"] == m["model"] for m in router.client.get("/api/tags").json()["models"])
    client = ollama.Client(host=router.url)
    for name in ("smol", "smol:latest"):
        assert client.chat(model=name, messages=HI, options={"num_predict": 1}).done
        assert router.client.post("/v1/chat/completions", json={"model": name, "messages": HI,
                                                                "max_tokens": 1}).status_code == 200
        assert router.client.get(f"/v1/models/{name}").json()["id"] == "smol"
        assert router.client.post("/api/show", json={"name": name}).status_code == 200
        assert router.client.post("/models/load", json={"model": name}).json() == {"success": True}


def test_7_2_model_info_is_always_there(router: Router) -> None:
    for name in ("smol", "fake"):  # fake is a `cmd` engine: no GGUF to read
        shown = ollama.Client(host=router.url).show(name)
        assert shown.modelinfo is not None
    assert ollama.Client(host=router.url).show("fake").modelinfo == {}


def test_7_3_show_serves_continue_and_litellm(router: Router) -> None:
    shown = router.client.post("/api/show", json={"name": "tools"}).json()
    first_context = next(v for k, v in shown["model_info"].items() if "context_length" in k)  # LiteLLM's rule
    assert first_context == 2048  # the served -c, not the trained 8192
    params = dict(re.match(r"^(\S+)\s+((?:\".*\")|\S+)$", line).groups() for line in
                  shown["parameters"].splitlines())  # Continue's parser
    assert params["num_ctx"] == "2048"
    assert "tools" in shown["template"].lower() and ".Suffix" in shown["template"]
    assert {"completion", "tools", "thinking", "insert"} <= set(shown["capabilities"])
    plain = router.client.post("/api/show", json={"name": "smol"}).json()  # no tools in its chat template
    assert "tools" not in plain["template"].lower() and ".Suffix" not in plain["template"]
    assert plain["capabilities"] == ["completion"]


def test_7_3_tool_calls_come_back_with_object_arguments(router: Router) -> None:
    history: list[dict[str, Any]] = []
    for city in ("Rome", "Oslo", "Lima", "Kyiv"):  # a tiny model needs examples to call a tool
        history += [{"role": "user", "content": f"Weather in {city}?"},
                    {"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": city}}}]}]
    messages = [*history, {"role": "user", "content": "Weather in Paris?"}]
    client = ollama.Client(host=router.url)
    reply = client.chat(model="tools", messages=messages, tools=[WEATHER_TOOL], think=False,  # llama-server
                        options={"temperature": 0, "num_predict": 40})  # thinks by default, as Ollama does
    assert reply.message.tool_calls, reply
    call = reply.message.tool_calls[0].function
    assert call.name == "get_weather" and call.arguments == {"city": "Paris"}
    streamed = [c for c in client.chat(model="tools", messages=messages, tools=[WEATHER_TOOL], stream=True,
                                       think=False, options={"temperature": 0, "num_predict": 40})
                if c.message.tool_calls]
    assert streamed and dict(streamed[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    api = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    openai_messages = [{**m, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps(m["tool_calls"][0]["function"]["arguments"])}}]}
        if "tool_calls" in m else m for i, m in enumerate(messages)]
    completion = api.chat.completions.create(model="tools", messages=openai_messages,
                                             tools=[WEATHER_TOOL], temperature=0, max_tokens=40,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    tool_call = (completion.choices[0].message.tool_calls or [])[0]
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}


def test_think_puts_the_reasoning_in_thinking(router: Router) -> None:
    client = ollama.Client(host=router.url)
    question = [{"role": "user", "content": "What is 2+2?"}]
    options = {"num_predict": 12, "temperature": 0}
    thought = client.chat(model="tools", messages=question, think=True, options=options)
    assert thought.message.thinking and not thought.message.content
    plain = client.chat(model="tools", messages=question, think=False, options=options)
    assert plain.message.content and not plain.message.thinking
    streamed = list(client.chat(model="tools", messages=question, think=True, options=options, stream=True))
    assert "".join(c.message.thinking or "" for c in streamed) == thought.message.thinking
    generated = client.generate(model="tools", prompt="What is 2+2?", think=True, options=options)
    assert generated.thinking and not generated.response


def test_7_3_suffix_fills_in_the_middle(router: Router) -> None:
    reply = ollama.Client(host=router.url).generate(model="tools", prompt="def add(a, b):\n    ",
                                                    suffix="\n    return c\n", options={"num_predict": 8})
    assert reply.done and reply.eval_count and reply.eval_count > 0  # answered by llama-server's /infill


@pytest.mark.parametrize(("keep_alive", "seconds"), [
    (1800, 1800), ("5m", 300), ("300", 300), ("-1", None), ("-1m", None), (-1, None), ("1h30m", 5400),
])
def test_7_5_keep_alive_is_parsed_leniently(router: Router, keep_alive: Any, seconds: int | None) -> None:
    # smol, not gemma: the other tests keep it loaded, and it reloads in 0.5 s after the unloads below (1.8)
    reply = router.client.post("/api/generate", json={"model": "smol", "keep_alive": keep_alive})
    assert reply.status_code == 200 and reply.json()["done_reason"] == "load"
    entry = next(m for m in router.client.get("/api/ps").json()["models"] if m["name"] == "smol:latest")
    expires = datetime.fromisoformat(entry["expires_at"])
    left = (expires - datetime.now(expires.tzinfo)).total_seconds()
    if seconds is None:
        assert expires.year >= 2200  # forever: a far-future date, as Ollama sends
    else:
        assert seconds - 30 < left <= seconds


@pytest.mark.parametrize("keep_alive", [0, "0", "0s"])
def test_7_5_keep_alive_zero_unloads(router: Router, keep_alive: Any) -> None:
    router.client.post("/api/generate", json={"model": "smol"}).raise_for_status()
    reply = router.client.post("/api/generate", json={"model": "smol", "keep_alive": keep_alive})
    assert reply.json()["done_reason"] == "unload"
    router.wait_status("smol", "unloaded", timeout=10)


def test_7_6_ndjson_hygiene(router: Router) -> None:
    for path, body in (("/api/chat", {"model": "smol", "messages": HI}), ("/api/generate", {"model": "smol",
                                                                                           "prompt": "Hi"})):
        _, lines = ndjson(router, path, {**body, "options": {"num_predict": 6}})
        assert lines[-1] == "" and all(line.strip() for line in lines[:-1])  # one object per line, no blanks
        objects = [json.loads(line) for line in lines[:-1]]
        assert all(len(line) < 4096 for line in lines)  # no huge `context` arrays
        if path == "/api/chat":
            assert all(o["message"]["role"] == "assistant" for o in objects)
        assert objects[-1]["done"] and all(isinstance(objects[-1][k], int) for k in TIMES)
        assert not any(o["done"] for o in objects[:-1])


def test_7_7_content_types(router: Router) -> None:
    get, post = router.client.get, router.client.post
    for reply in (get("/api/tags"), get("/api/ps"), get("/api/version"), post("/api/show", json={"model": "smol"}),
                  post("/api/chat", json={"model": "smol", "messages": HI, "stream": False,
                                          "options": {"num_predict": 1}}),
                  post("/api/generate", json={"model": "smol"}), post("/api/chat", json={"model": "nope"}),
                  get("/v1/models"), post("/v1/chat/completions", json={"model": "smol", "messages": HI,
                                                                         "max_tokens": 1})):
        assert reply.headers["content-type"].startswith("application/json"), reply.url
    headers, _ = ndjson(router, "/api/chat", {"model": "smol", "messages": HI, "options": {"num_predict": 1}})
    assert headers["content-type"] == "application/x-ndjson"
    headers, _ = sse_events(router, {"model": "smol", "messages": HI, "max_tokens": 1, "stream": True})
    assert headers["content-type"].startswith("text/event-stream")


def test_7_9_clients_with_a_trailing_slash_or_without_v1(router: Router) -> None:
    assert {m.model for m in ollama.Client(host=router.url + "/").list().models} >= {"smol:latest"}
    bare = openai.OpenAI(base_url=router.url, api_key="unused", max_retries=0)  # no /v1
    assert {m.id for m in bare.models.list().data} >= {"smol"}
    reply = bare.chat.completions.create(model="smol", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_7_10_done_ends_every_stream_even_after_the_usage_chunk(router: Router) -> None:
    _, events = sse_events(router, {"model": "smol", "messages": HI, "max_tokens": 4, "stream": True,
                                    "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert_shape(json.loads(events[-2]), SHAPES["usage_chunk"])


def test_7_11_max_completion_tokens_is_honoured(router: Router) -> None:
    reply = router.client.post("/v1/chat/completions", json={
        "model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_completion_tokens": 3}).json()
    assert "usage" in reply, reply
    assert reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"


def test_7_12_timestamps_are_rfc3339_with_at_most_microseconds(router: Router) -> None:
    router.client.post("/api/generate", json={"model": "smol", "keep_alive": -1}).raise_for_status()
    stamps = [m["modified_at"] for m in router.client.get("/api/tags").json()["models"]]
    stamps += [m["expires_at"] for m in router.client.get("/api/ps").json()["models"]]
    stamps.append(router.client.post("/api/show", json={"model": "smol"}).json()["modified_at"])
    stamps.append(router.client.post("/api/chat", json={"model": "smol", "messages": HI, "stream": False,
                                                        "options": {"num_predict": 1}}).json()["created_at"])
    for stamp in stamps:
        assert RFC3339.match(stamp), stamp
        datetime.fromisoformat(stamp)
    forever = next(m for m in router.client.get("/api/ps").json()["models"] if m["name"] == "smol:latest")
    assert datetime.fromisoformat(forever["expires_at"]).year >= 2200


def test_open_webui_parses_the_version() -> None:
    """Open WebUI: tuple(map(int, re.sub(r"^v|-.*", "", v).split("."))) must not raise."""
    from modelyard import __version__

    assert tuple(map(int, re.sub(r"^v|-.*", "", __version__).split(".")))
