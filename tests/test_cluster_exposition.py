"""cluster/exposition.py: the nodes' Prometheus texts merged into one exposition with a `node` label (pure), checked
with prometheus_client's own parser, which refuses a family split into two groups."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from modelyard.cluster.exposition import _labelled, merged


def exposition(requests: int, loaded: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("modelyard_requests", "Requests.", ["model"], registry=registry)
    counter.labels("smol").inc(requests)
    Gauge("modelyard_models_loaded", "Models loaded.", registry=registry).set(loaded)
    Histogram("modelyard_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_each_family_once_with_every_nodes_samples_labelled() -> None:
    text = merged({"n1": exposition(3, 1), "n2": exposition(5, 2)})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE modelyard_requests_total counter") + text.count("# TYPE modelyard_requests counter") == 1
    totals = {(s.labels["node"], s.labels["model"]): s.value for s in families["modelyard_requests"].samples
              if s.name == "modelyard_requests_total"}
    assert totals == {("n1", "smol"): 3.0, ("n2", "smol"): 5.0}
    assert {s.labels["node"]: s.value for s in families["modelyard_models_loaded"].samples} == {"n1": 1.0, "n2": 2.0}
    buckets = [s for s in families["modelyard_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert sorted((s.labels["node"], s.labels["le"]) for s in buckets) == [
        ("n1", "+Inf"), ("n1", "0.1"), ("n1", "1.0"), ("n2", "+Inf"), ("n2", "0.1"), ("n2", "1.0")]


def test_a_sample_gets_the_node_as_its_first_label() -> None:
    assert _labelled('x{a="b"} 1.0', "n1") == 'x{node="n1",a="b"} 1.0'
    assert _labelled("x 2", "n1") == 'x{node="n1"} 2'
    assert _labelled("x{} 2 1700000000", 'a"b') == 'x{node="a\\"b"} 2 1700000000'
    assert merged({}) == "" and merged({"n1": ""}) == ""


def test_a_key_limited_to_some_models_sees_only_their_series() -> None:
    text = merged({"n1": 'm{model="smol"} 1\nm{model="gemma"} 2\nup 1\n'}, visible=lambda model: model == "smol")
    assert text == 'm{node="n1",model="smol"} 1\nup{node="n1"} 1\n'
