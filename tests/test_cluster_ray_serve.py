"""`modelyard serve --ray local:2` as a new user runs it (docs/cluster.md; the `ray` extra, so `make test` skips it
and `make test-cluster` runs it): one command brings up a two-node local cluster with the demo models, and one
endpoint serves them with the single node's APIs, says where each model runs, and on SIGTERM leaves no
llama-server and no Ray process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from modelyard.engine import webui
from tests.conftest import Router
from tests.test_dashboard import LOAD_TIMEOUT_MS, browser  # noqa: F401  (the shared Chromium)
from tests.test_webui import _loaded, _model_menu, _open_menu, _option

pytest.importorskip("ray")


def descendants(pid: int) -> set[int]:
    """Every process under `pid` (Ray's raylets and workers, and the llama-server children of its agents)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, module_models_dir: Path) -> Iterator[Router]:
    work = tmp_path_factory.mktemp("serve-ray")
    router = Router(["--ray", "local:2", "--models-dir", str(module_models_dir), "--memory-budget", "4GiB",
                     "-c", "1024", "-n", "8"], work)
    try:
        router.wait_ready(120)  # healthy once a node's agent has published
        while router.client.get("/health").json().get("nodes") != 2:
            pass  # the second agent starts a moment after the first (each is one request to its node)
        yield router
    finally:
        if router.proc.poll() is None:
            router.stop()


def test_one_endpoint_serves_the_demo_models_of_both_nodes(cluster: Router) -> None:
    listing = cluster.client.get("/v1/models").json()["data"]
    assert sorted(entry["id"] for entry in listing) == ["gemma", "smol", "smol-b"]
    assert all(len(entry["nodes"]) == 2 for entry in listing)  # each node has the models dir
    answer = cluster.client.post("/v1/chat/completions", json={
        "model": "smol", "messages": [{"role": "user", "content": "Say hi."}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    with cluster.client.stream("POST", "/api/chat", json={
            "model": "gemma", "messages": [{"role": "user", "content": "Say hi."}]}) as stream:
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert stream.status_code == 200 and lines[-1]["done"] is True and len(lines) > 2  # Ollama's NDJSON stream
    where = {entry["id"]: {n["node"]: n["status"] for n in entry["nodes"]}
             for entry in cluster.client.get("/v1/models").json()["data"]}
    assert list(where["smol"].values()).count("loaded") == 1 and list(where["gemma"].values()).count("loaded") == 1
    assert cluster.log().count("joined: http://127.0.0.1:") == 2  # a one-machine trial's node apps: loopback only
    page = cluster.client.get("/", headers={"Accept": "text/html"})  # llama.cpp's web UI, when built here
    built = webui.installed_ui()
    if built is not None:
        assert page.status_code == 200 and page.text == (built / "index.html").read_text()
    assert cluster.client.get("/").text == "Ollama is running"
    missing = cluster.client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_the_web_ui_selects_loads_and_chats_through_the_cluster(browser: Browser, cluster: Router) -> None:  # noqa: F811
    """llama.cpp's web UI against the front, as test_webui drives it against one node: the menu lists the
    cluster's models, selecting one loads it on a node, and a chat streams its reply."""
    if webui.installed_ui() is None:
        pytest.skip("llama.cpp's web UI is not built on this machine")
    context = browser.new_context(base_url=cluster.url, viewport={"width": 1280, "height": 800},
                                  service_workers="block")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto("/", wait_until="load")
        _open_menu(page)
        expect(page.get_by_role("option")).to_have_count(3)
        with page.expect_request(lambda r: r.url.endswith("/models/load")):
            _option(page, "smol-b").click()
        _model_menu(page).click()
        expect(_loaded(_option(page, "smol-b"))).to_have_count(1, timeout=LOAD_TIMEOUT_MS)
        page.keyboard.press("Escape")
        box = page.get_by_role("textbox").first
        box.fill("Say hi.")
        with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
            box.press("Enter")
        events = [line for line in answer.value.text().splitlines() if line.startswith("data: ")]
        assert answer.value.status == 200 and events[-1] == "data: [DONE]"
        reply = page.get_by_role("group", name="Assistant message with actions").locator(".markdown-content")
        expect(reply).to_have_text(re.compile(r"\w"))
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def test_the_dashboard_shows_the_cluster_with_the_real_engine(browser: Browser, cluster: Router) -> None:  # noqa: F811
    """The dashboard (/ui) against the front, after the tests above: where each model runs, the requests of both
    nodes with the node each ran on, and a model's llama-server lines with their node (cluster/insight.py)."""
    where = {entry["id"]: [n["node"] for n in entry["nodes"] if n["status"] == "loaded"]
             for entry in cluster.client.get("/v1/models").json()["data"]}
    [smol_node] = where["smol"]
    activity = cluster.client.get("/activity").json()["data"]
    chat = next(r for r in activity if r["model"] == "smol" and r["route"] == "/v1/chat/completions")
    assert chat["node"] == smol_node and chat["id"].startswith(f"{smol_node}:")
    assert any(d["kind"] == "load" and d["model"] == "smol" and d["node"] == smol_node
               for d in cluster.client.get("/decisions").json()["data"])
    lines = cluster.client.get("/logs/smol").json()["lines"]
    assert lines and {line["node"] for line in lines} == {smol_node}
    context = browser.new_context(base_url=cluster.url, viewport={"width": 1360, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto("/ui", wait_until="load")
        expect(page.locator('#models tr[data-model="smol"] [data-node]')).to_have_count(1)
        expect(page.locator(f'#models tr[data-model="smol"] [data-node="{smol_node}"]')).to_contain_text("loaded")
        expect(page.locator("#live")).to_have_text("live")
        page.goto("/ui#/activity", wait_until="load")
        expect(page.locator(f'#activity tr[data-id="{chat["id"]}"]')).to_contain_text(f"node {smol_node[:8]}")
        page.goto("/ui#/logs/smol", wait_until="load")
        expect(page.locator(f'#log .line[data-node="{smol_node}"]').first).to_be_visible()
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def test_sigterm_leaves_no_child_and_no_ray_process(cluster: Router) -> None:
    cluster.client.post("/models/load", json={"model": "smol-b"})
    processes = descendants(cluster.proc.pid)
    assert any("llama-server" in command(pid) for pid in processes), [command(p) for p in processes]
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(timeout=90) == 0, cluster.log()
    left = {pid: command(pid) for pid in processes if os.path.exists(f"/proc/{pid}") and command(pid)}
    assert left == {}, left
    with pytest.raises(httpx.TransportError):
        httpx.get(cluster.url + "/health", timeout=2)


def test_a_preset_every_node_refuses_stops_the_command_with_its_reason(tmp_path: Path) -> None:
    """As a single node refuses to start on a bad preset: each agent's start fails on it, and serve --ray exits
    1 with the first node's reason in one line, leaving no Ray process."""
    preset = tmp_path / "bad.ini"
    preset.write_text("[m]\nmodel = /nonexistent.gguf\n")
    proc = subprocess.Popen([sys.executable, "-m", "modelyard.cli", "serve", "--ray", "local:1", "--port", "0",
                             "--models-preset", str(preset)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: node ") and "agent did not start" in last, err
    assert last.endswith("bad.ini:2 [m]: model file '/nonexistent.gguf' does not exist"), err
    assert "Traceback" not in err
    assert descendants(proc.pid) == set()
