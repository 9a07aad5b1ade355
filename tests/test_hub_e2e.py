"""Hugging Face models end to end, never touching the internet: `modelyard serve` with HF_ENDPOINT on the
fake hub (tests/fake_hub.py) serving the real SmolLM2 demo file. A preset with `hf-repo` downloads it on its
first request and answers a chat through the real engine, started with -m on the cached file; `modelyard pull`
fetches another model through the server with its progress bar in a terminal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import ollama
import pexpect
import pytest
from click.testing import CliRunner

from modelyard.cli import main
from modelyard.demo import SMOLLM2
from tests.conftest import Router
from tests.fake_hub import FakeHub, running

SMOL_REPO = "ggml-org/SmolLM2-135M-Instruct-GGUF"
TINY = "org/tiny-GGUF"
OTHER = "org/other-GGUF"


@pytest.fixture(scope="module")
def hub(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    tiny = tmp_path_factory.mktemp("tiny") / "tiny-Q4_K_M.gguf"
    tiny.write_bytes(b"GGUF" + os.urandom(2 * 2**20))
    fake = FakeHub()
    fake.add(SMOL_REPO, "SmolLM2-135M-Instruct-Q4_1.gguf", demo_models[SMOLLM2])
    fake.add(SMOL_REPO, "SmolLM2-135M-Instruct-F16.gguf", tiny)  # never fetched: the preset asks for Q4_1
    fake.add(TINY, "tiny-Q4_K_M.gguf", tiny)
    fake.add(OTHER, "other-Q8_0.gguf", tiny)
    with running(fake):
        yield fake


@pytest.fixture(scope="module")
def router(hub: FakeHub, start_module_router: Callable[..., Router], llama_server: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Router:
    home = tmp_path_factory.mktemp("hf")
    preset = home / "models.ini"
    preset.write_text(f"[smol-hf]\nhf-repo = {SMOL_REPO}:Q4_1\n")
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(home / "hub"), "HF_HOME": str(home), "HF_TOKEN": ""}
    return start_module_router("--models-preset", str(preset), "-c", "2048", env=env)


def test_a_preset_with_hf_repo_downloads_on_first_use_and_answers(router: Router, hub: FakeHub) -> None:
    entry = next(m for m in router.client.get("/models").json()["data"] if m["id"] == "smol-hf")
    assert entry["path"] is None and entry["status"]["value"] == "unloaded"  # not in the cache yet
    reply = router.client.post("/v1/chat/completions", json={
        "model": "smol-hf", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    assert [seen.path.rsplit("/", 1)[-1] for seen in hub.downloads()] == [
        hub.repos[SMOL_REPO]["SmolLM2-135M-Instruct-Q4_1.gguf"].sha256]
    listed = {m["id"]: m for m in router.client.get("/models").json()["data"]}
    path = listed["smol-hf"]["path"]
    assert path.endswith("SmolLM2-135M-Instruct-Q4_1.gguf") and "/snapshots/" in path
    args = listed["smol-hf"]["status"]["args"]
    assert args[args.index("--model") + 1] == path and not [a for a in args if a.startswith("--hf")]
    assert listed[f"{SMOL_REPO}:Q4_1"]["source"] == "cache"  # and the cache lists it, as router mode does


def test_modelyard_pull_shows_progress_and_the_model_is_listed(router: Router, hub: FakeHub) -> None:
    hub.pace = 0.2  # long enough for the bar to be drawn
    env = {**os.environ, "MODELYARD_URL": router.url, "TERM": "xterm"}
    pull = pexpect.spawn(sys.executable, ["-m", "modelyard.cli", "pull", f"{TINY}:q4_k_m"], env=env,
                         encoding="utf-8", timeout=60, dimensions=(40, 160))
    try:
        pull.expect(rf"pulling {TINY}:Q4_K_M.*MB")  # the bar, with bytes
        pull.expect(rf"{TINY}:Q4_K_M downloaded \(2\.0 MiB in ")
        pull.expect(pexpect.EOF)
    finally:
        pull.close(force=True)
        hub.pace = 0.0
    assert pull.exitstatus == 0
    listed = {m["id"]: m for m in router.client.get("/models").json()["data"]}
    assert listed[f"{TINY}:Q4_K_M"]["source"] == "cache"
    again = CliRunner().invoke(main, ["pull", f"{TINY}:Q4_K_M", "--url", router.url, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"model": f"{TINY}:Q4_K_M", "status": "present", "bytes": 0, "seconds": 0.0}


def test_the_ollama_client_pulls_and_deletes(router: Router) -> None:
    client = ollama.Client(host=router.url)
    steps = list(client.pull(f"hf.co/{OTHER}:Q8_0", stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    assert any(step.digest and step.total and step.completed == step.total for step in steps)
    assert f"{OTHER}:Q8_0" in [m.model for m in client.list().models]
    assert client.delete(f"hf.co/{OTHER}:Q8_0").status == "success"
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.delete(f"hf.co/{OTHER}:Q8_0")
