"""What the dashboard reads at the cluster's front (cluster/insight.py): the merges by table, then in-process
over real single-node apps with fake children (test_cluster_ingress.py's harness, the front built as in
test_cluster_front.py): activity and decisions from both nodes with ids that name their node, a cancel sent to
the request's node, the streams with each event's node, logs merged from the nodes that serve a model, keys as
on one node, and the dashboard itself in headless Chromium against the front (its NODE column, its activity
page cancelling a request on a node by the id the front gave it).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, async_playwright, expect

from modelyard.api.auth import ApiKey, Scope
from modelyard.api.context import ServerSettings
from modelyard.cluster.insight import (
    front_id,
    merged_activity,
    merged_decisions,
    merged_lines,
    node_record,
)
from modelyard.scheduler import Limits
from tests.test_cluster_front import ADMIN, LIMITED, front, with_aliases
from tests.test_cluster_ingress import Cluster, make_cluster, ready_at_once, streaming  # noqa: F401 (the fixture)

# a (its hash ranks n2 first) loads on n2, which holds one model; b then fits without an eviction only on n1
LIMITS = {"n1": Limits(max_models=2), "n2": Limits(max_models=1)}
ADMIN_OF_A = ApiKey("admin-a", label="admin of a", models=("a",), scopes=frozenset(Scope))
ARTIFACTS = Path(__file__).parent / "artifacts"  # screenshots, for inspection (ignored by git)
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# --- the merges, by table ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "named"), [
    ("n1:3", ("n1", 3)),
    ("a:b:12", ("a:b", 12)),  # only the last part is the node's own id
    (front_id("0123abcd" * 7, 41), ("0123abcd" * 7, 41)),  # a Ray node id
    ("12", None),  # a single node's id: no node named
    (":3", None),
    ("n1:", None),
    ("n1:x", None),
    ("n1:-1", None),
])
def test_a_front_id_names_its_node_and_the_nodes_own_id(raw: str, named: tuple[str, int] | None) -> None:
    assert node_record(raw) == named


def _record(rid: int, time: float, model: str | None, duration: float | None = 1.0) -> dict[str, Any]:
    return {"id": rid, "time": time, "model": model, "duration": duration, "state": "done"}


def _everything(model: str | None) -> bool:
    return True


def _only_a(model: str | None) -> bool:
    return model == "a"


@pytest.mark.parametrize(("limit", "visible", "recent", "in_flight"), [
    # newest end first (n1's 1 ended at 12, n2's 1 at 11, n1's 2 at 10.5), in flight oldest first
    (10, _everything, ["n1:1", "n2:1", "n1:2", "n2:2"], ["n2:3", "n1:3"]),
    (2, _everything, ["n1:1", "n2:1"], ["n2:3", "n1:3"]),  # the limit cuts the merged list, not each node's
    (10, _only_a, ["n1:1", "n2:2"], ["n2:3"]),  # a key limited to a: b's and the model-less ones are hidden
])
def test_activity_merges_newest_first_with_ids_that_name_the_node(
        limit: int, visible: Callable[[str | None], bool], recent: list[str], in_flight: list[str]) -> None:
    answers = {"n1": {"data": [_record(1, 10.0, "a", 2.0), _record(2, 10.0, "b", 0.5)],
                      "in_flight": [{"id": 3, "time": 30.0, "model": "b"}]},
               "n2": {"data": [_record(1, 9.0, "b", 2.0), _record(2, 1.0, "a")],
                      "in_flight": [{"id": 3, "time": 20.0, "model": "a"}]}}
    merged = merged_activity(answers, limit, visible)
    assert [r["id"] for r in merged["data"]] == recent
    assert [r["id"] for r in merged["in_flight"]] == in_flight
    assert all(r["node"] == r["id"].split(":")[0] for r in merged["data"] + merged["in_flight"])


def test_a_record_of_no_model_follows_the_visibility_rule() -> None:
    answers = {"n1": {"data": [_record(1, 1.0, None, None)], "in_flight": []}}
    assert [r["id"] for r in merged_activity(answers, 5, _everything)["data"]] == ["n1:1"]
    assert merged_activity(answers, 5, _only_a)["data"] == []


@pytest.mark.parametrize(("limit", "visible", "decided", "waiting", "blocked_by"), [
    (10, _everything, [("n2", 5.0), ("n1", 4.0), ("n1", 1.0)], [("n1", 7), ("n2", 1)], [["b"], ["a", "b"]]),
    (1, _everything, [("n2", 5.0)], [("n1", 7), ("n2", 1)], [["b"], ["a", "b"]]),
    (10, _only_a, [("n2", 5.0), ("n1", 1.0)], [("n2", 1)], [["a"]]),  # what blocks a is cut to what it sees
])
def test_decisions_merge_newest_first_and_the_waiting_node_after_node(
        limit: int, visible: Callable[[str | None], bool], decided: list[tuple[str, float]],
        waiting: list[tuple[str, int]], blocked_by: list[list[str]]) -> None:
    answers = {"n1": {"data": [{"time": 4.0, "model": "b"}, {"time": 1.0, "model": "a"}],
                      "waiting": [{"request": 7, "model": "b", "blocked_by": ["b"]}]},
               "n2": {"data": [{"time": 5.0, "model": "a"}],
                      "waiting": [{"request": 1, "model": "a", "blocked_by": ["a", "b"]}]}}
    merged = merged_decisions(answers, limit, visible)
    assert [(d["node"], d["time"]) for d in merged["data"]] == decided
    assert [(w["node"], w["request"]) for w in merged["waiting"]] == waiting
    assert [w["blocked_by"] for w in merged["waiting"]] == blocked_by


@pytest.mark.parametrize(("count", "lines"), [
    (10, [("n2", "x0"), ("n1", "a1"), ("n2", "x1"), ("n1", "a2")]),  # by time; a tie keeps the nodes' order
    (2, [("n2", "x1"), ("n1", "a2")]),  # the last ones
    (0, []),
])
def test_log_lines_merge_oldest_first(count: int, lines: list[tuple[str, str]]) -> None:
    answers = {"n1": [{"time": 2.0, "line": "a1"}, {"time": 3.0, "line": "a2"}],
               "n2": [{"time": 1.0, "line": "x0"}, {"time": 2.0, "line": "x1"}]}
    assert [(line["node"], line["line"]) for line in merged_lines(answers, count)] == lines


# --- in-process, over real node apps ---------------------------------------------------------------------------

async def two_nodes(make_cluster: Callable[..., Any], settings: ServerSettings | None = None) -> Cluster:  # noqa: F811
    cluster: Cluster = await make_cluster(LIMITS, with_aliases(), front(settings or ServerSettings()))
    for node in cluster.nodes.values():
        node.fleet.prepare = ready_at_once
    return cluster


async def complete(cluster: Cluster, model: str, stream: bool = False) -> aiohttp.ClientResponse:
    """A chat completion with the admin key (which a front without keys ignores)."""
    return await cluster.client.post("/v1/chat/completions", headers={"Authorization": "Bearer admin"}, json={
        "model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


async def one_request_on_each_node(cluster: Cluster) -> None:
    for model in ("a", "b"):
        response = await complete(cluster, model)
        assert response.status == 200, await response.text()
    assert (cluster.nodes["n2"].loads("a"), cluster.nodes["n1"].loads("b")) == (1, 1)


async def test_activity_lists_both_nodes_requests_with_ids_that_name_their_node(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, LIMITED)))
    await one_request_on_each_node(cluster)
    admin = {"Authorization": "Bearer admin"}
    listing = await (await cluster.client.get("/activity", headers=admin)).json()
    # each node's first request has its id 1: the front's ids tell them apart
    assert sorted((r["id"], r["node"], r["model"]) for r in listing["data"]) == [("n1:1", "n1", "b"),
                                                                                ("n2:1", "n2", "a")]
    assert listing["data"][0]["model"] == "b" and listing["in_flight"] == []  # newest first
    one = await (await cluster.client.get("/activity?limit=1", headers=admin)).json()
    assert [r["id"] for r in one["data"]] == ["n1:1"]
    filtered = await (await cluster.client.get("/activity?model=aa", headers=admin)).json()  # by an alias
    assert [r["id"] for r in filtered["data"]] == ["n2:1"]
    limited = await (await cluster.client.get("/activity", headers={"Authorization": "Bearer only-a"})).json()
    assert [r["model"] for r in limited["data"]] == ["a"]
    bad = await cluster.client.get("/activity?limit=0", headers=admin)
    assert bad.status == 400 and "limit must be a whole number" in (await bad.json())["error"]["message"]
    assert (await cluster.client.get("/activity")).status == 401


async def test_a_cancel_goes_to_the_requests_node_with_its_own_id(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, ADMIN_OF_A, LIMITED)))
    admin = {"Authorization": "Bearer admin"}
    await one_request_on_each_node(cluster)  # n1's and n2's request 1 are done: the next on n2 is its 2
    node = cluster.nodes["n2"]
    opened = asyncio.Event()
    node.fleet.children["a"][0].handler = streaming(opened)
    pending = asyncio.ensure_future(complete(cluster, "a", stream=True))
    await opened.wait()
    listing = await (await cluster.client.get("/activity", headers=admin)).json()
    assert [(r["id"], r["state"]) for r in listing["in_flight"]] == [("n2:2", "running")]

    assert (await cluster.client.post("/activity/n1:2/cancel", headers=admin)).status == 404  # n1 has no 2
    assert (await cluster.client.post("/activity/n3:2/cancel", headers=admin)).status == 404  # no such node
    bad = await cluster.client.post("/activity/2/cancel", headers=admin)  # a node's own id is not the front's
    assert bad.status == 400 and "NODE:ID" in (await bad.json())["error"]["message"]
    assert (await cluster.client.post("/activity/n2:2/cancel",
                                      headers={"Authorization": "Bearer only-a"})).status == 403  # no admin scope
    cancel = await cluster.client.post("/activity/n2:2/cancel", headers={"Authorization": "Bearer admin-a"})
    assert cancel.status == 200 and await cancel.json() == {"success": True}
    stream = await pending
    assert stream.status == 200
    rest = (await stream.read()).decode()
    assert "cancelled by an admin" in rest and rest.rstrip().endswith("data: [DONE]")
    done = await (await cluster.client.get("/activity", headers=admin)).json()
    assert done["in_flight"] == [] and done["data"][0]["id"] == "n2:2"
    assert "cancelled by an admin" in done["data"][0]["error"]


async def test_a_key_limited_to_some_models_cannot_cancel_anothers_request(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, ADMIN_OF_A)))
    await one_request_on_each_node(cluster)
    node = cluster.nodes["n1"]
    opened = asyncio.Event()
    node.fleet.children["b"][0].handler = streaming(opened)
    pending = asyncio.ensure_future(complete(cluster, "b", stream=True))
    await opened.wait()
    refused = await cluster.client.post("/activity/n1:2/cancel", headers={"Authorization": "Bearer admin-a"})
    assert refused.status == 404  # as on one node: a request the key may not see is not in flight for it
    assert (await cluster.client.post("/activity/n1:2/cancel", headers={"Authorization": "Bearer admin"})).status == 200
    assert "cancelled by an admin" in (await (await pending).read()).decode()


async def _events(response: aiohttp.ClientResponse, name: str, until: Callable[[list[dict[str, Any]]], bool],
                  ) -> list[dict[str, Any]]:
    """The `name` events of an SSE answer until `until` holds of them (frames of other names are skipped)."""
    events: list[dict[str, Any]] = []
    current = None
    while not until(events):
        line = (await response.content.readline()).decode().rstrip("\n")
        if line.startswith("event: "):
            current = line[7:]
        elif line.startswith("data: ") and current == name:
            events.append(json.loads(line[6:]))
    return events


async def test_the_activity_stream_relays_each_nodes_records_with_its_node(
        make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, LIMITED)))
    every = await cluster.client.get("/activity/sse", headers={"Authorization": "Bearer admin"})
    only_a = await cluster.client.get("/activity/sse", headers={"Authorization": "Bearer only-a"})
    assert every.headers["Content-Type"] == "text/event-stream"
    # subscribed to both nodes before the answers started: the records made now are relayed
    await one_request_on_each_node(cluster)
    done = await _events(every, "request", lambda events: sum(e["state"] == "done" for e in events) == 2)
    assert {(e["id"], e["node"], e["model"]) for e in done if e["state"] == "done"} == {("n2:1", "n2", "a"),
                                                                                       ("n1:1", "n1", "b")}
    mine = await _events(only_a, "request", lambda events: any(e["state"] == "done" for e in events))
    assert {e["model"] for e in mine} == {"a"}
    every.close()
    only_a.close()


async def test_decisions_are_merged_and_streamed_with_their_node(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, LIMITED)))
    admin, limited = {"Authorization": "Bearer admin"}, {"Authorization": "Bearer only-a"}
    feed = await cluster.client.get("/decisions/sse", headers=admin)
    await one_request_on_each_node(cluster)
    streamed = await _events(feed, "decision", lambda events: len({e["model"] for e in events}) == 2)
    assert {(e["node"], e["model"], e["kind"]) for e in streamed} == {("n2", "a", "load"), ("n1", "b", "load")}
    feed.close()
    listing = await (await cluster.client.get("/decisions", headers=admin)).json()
    assert {(d["node"], d["model"], d["kind"]) for d in listing["data"]} == {("n2", "a", "load"),
                                                                            ("n1", "b", "load")}
    assert listing["waiting"] == []
    assert len((await (await cluster.client.get("/decisions?limit=1", headers=admin)).json())["data"]) == 1
    mine = await (await cluster.client.get("/decisions", headers=limited)).json()
    assert {d["model"] for d in mine["data"]} == {"a"}


async def test_logs_come_from_the_nodes_that_serve_the_model(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN, LIMITED)))
    admin, limited = {"Authorization": "Bearer admin"}, {"Authorization": "Bearer only-a"}
    await one_request_on_each_node(cluster)
    child = cluster.nodes["n2"].fleet.children["a"][0]
    logs = await (await cluster.client.get("/logs/aa", headers=admin)).json()  # an alias names the model
    assert logs["model"] == "a"
    assert [(line["node"], line["line"]) for line in logs["lines"]] == [("n2", "fake: loading")]
    tail = await cluster.client.get("/logs/sse?model=a", headers=admin)
    child.say("fake: a line said after the subscription")
    said = await _events(tail, "log", lambda events: bool(events))
    assert said == [{"model": "a", "time": said[0]["time"], "line": "fake: a line said after the subscription",
                     "node": "n2"}]
    tail.close()
    every = await cluster.client.get("/logs/sse", headers=limited)  # every model the key may see
    cluster.nodes["n1"].fleet.children["b"][0].say("fake: b's line, hidden from this key")
    child.say("fake: a's line")
    assert [e["line"] for e in await _events(every, "log", lambda events: bool(events))] == ["fake: a's line"]
    every.close()
    assert (await cluster.client.get("/logs/nope", headers=admin)).status == 404
    assert (await cluster.client.get("/logs/sse?model=nope", headers=admin)).status == 404
    assert (await cluster.client.get("/logs/b", headers=limited)).status == 403
    assert (await cluster.client.get("/logs/a?lines=0", headers=admin)).status == 400


async def test_the_dashboard_is_served_at_the_front_under_the_prefix(make_cluster: Callable[..., Any]) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster, ServerSettings(api_keys=(ADMIN,), api_prefix="/llm"))
    page = await cluster.client.get("/llm/ui")  # no key: the page holds no data
    assert page.status == 200 and '="/llm/ui/app.js"' in await page.text()
    assert (await cluster.client.get("/llm/ui/models.js")).headers["Content-Type"].startswith("text/javascript")
    assert (await cluster.client.get("/llm/activity")).status == 401


# --- the dashboard in headless Chromium, against the front ----------------------------------------------------

@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (`make test` installs Debian's chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    return CHROMIUM


async def test_the_dashboard_shows_where_each_model_runs_and_cancels_on_the_right_node(
        make_cluster: Callable[..., Any], chromium: Path) -> None:  # noqa: F811
    cluster = await two_nodes(make_cluster)
    await one_request_on_each_node(cluster)  # a on n2, b on n1, each node's request 1
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        page = await browser.new_page(base_url=str(cluster.client.make_url("")))
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            await _models_page(page, cluster)
            await _activity_page(page, cluster)
        finally:
            await browser.close()
    assert not errors, f"the page threw: {errors}"


async def _models_page(page: Page, cluster: Cluster) -> None:
    await page.goto("/ui", wait_until="load")
    await expect(page.locator("#models th", has_text="Node")).to_be_visible()
    a_on_n2 = page.locator('#models tr[data-model="a"] [data-node="n2"]')
    await expect(a_on_n2).to_contain_text("loaded")
    await expect(page.locator('#models tr[data-model="a"] [data-node="n1"]')).to_have_count(0)  # not run there
    await expect(page.locator('#models tr[data-model="b"] [data-node="n1"]')).to_contain_text("loaded")
    await expect(page.locator("#live")).to_have_text("live")
    await page.locator("body").screenshot(path=ARTIFACTS / "cluster-models.png")
    # a change on one node shows in that node's line: b unloaded on n1 leaves it running nowhere
    await page.locator('#models tr[data-model="b"]').get_by_role("button", name="Unload", exact=True).click()
    await expect(page.locator('#models tr[data-model="b"] [data-role="status"]')).to_have_text("unloaded")
    await expect(page.locator('#models tr[data-model="b"] [data-node]')).to_have_count(0)
    await expect(a_on_n2).to_contain_text("loaded")


async def _activity_page(page: Page, cluster: Cluster) -> None:
    await page.goto("/ui#/activity", wait_until="load")
    recent = page.locator("#activity tbody tr")
    await expect(recent).to_have_count(2)
    await expect(page.locator('#activity tr[data-id="n2:1"]')).to_contain_text("n2")
    await expect(page.locator('#activity tr[data-id="n1:1"]')).to_contain_text("n1")
    await expect(page.locator("#live")).to_have_text("live")
    opened = asyncio.Event()
    cluster.nodes["n2"].fleet.children["a"][0].handler = streaming(opened)
    pending = asyncio.ensure_future(complete(cluster, "a", stream=True))  # n2's request 2, in flight
    running = page.locator('#in-flight tr[data-id="n2:2"][data-state="running"]')
    await running.get_by_role("button", name="Cancel").click()
    await expect(running).to_have_count(0)
    await expect(page.locator('#activity tr[data-id="n2:2"] .error')).to_contain_text("cancelled by an admin")
    assert "cancelled by an admin" in (await (await pending).read()).decode()
    await page.locator("body").screenshot(path=ARTIFACTS / "cluster-activity.png")
    await expect(recent).to_have_count(3)  # n1's request 1 is still its own row
