"""What `--ray` decides before Ray is involved (cluster.membership, cluster.agent; no Ray needed, so `make test`
runs it): `local:N` parsed, one machine's budgets and cores split between its fake nodes, the budgets a node
declares replacing the flags', and the one error line without the `ray` extra.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelyard.cluster.agent import GIB, GPU_MEMORY_RESOURCE, MEMORY_RESOURCE, NODE_RESOURCE, NodeSettings
from modelyard.cluster.membership import RayMissing, connect, local_count, local_nodes
from modelyard.config.presets import ConfigError
from modelyard.scheduler import Limits


@pytest.mark.parametrize(("address", "count"), [("local:1", 1), ("local:3", 3), ("auto", None),
                                                ("10.0.0.7:6379", None), ("ray://head:10001", None)])
def test_local_n_is_a_local_cluster_and_anything_else_goes_to_ray_init(address: str, count: int | None) -> None:
    assert local_count(address) == count


@pytest.mark.parametrize("address", ["local:", "local:0", "local:two", "local:-1", "local:2.5"])
def test_local_needs_a_whole_number_of_nodes(address: str) -> None:
    with pytest.raises(ConfigError, match="local:N needs a whole number of nodes"):
        local_count(address)


def test_three_local_nodes_share_the_budget_and_never_promise_it_three_times() -> None:
    nodes = local_nodes(3, memory_budget=int(19.2 * GIB), gpu_memory_budget=0, total_memory=24 * GIB, cores=[0, 1])
    assert [dict(n.resources) for n in nodes] == [{NODE_RESOURCE: 1, MEMORY_RESOURCE: 6}] * 3  # 6.4 rounded down
    assert [n.memory for n in nodes] == [8 * GIB] * 3  # Ray's own `memory`: the machine, split
    assert [n.cpus for n in nodes] == [{0}, {1}, {0}]  # fewer cores than nodes: one each, in turn
    assert nodes[0].ray_args()["num_cpus"] == 1


def test_no_budget_declares_none_and_a_gpu_budget_is_split_too() -> None:
    (node,) = local_nodes(1, memory_budget=0, gpu_memory_budget=16 * GIB, total_memory=8 * GIB, cores=[0, 1, 2, 3])
    assert dict(node.resources) == {NODE_RESOURCE: 1, GPU_MEMORY_RESOURCE: 16}
    assert node.cpus == {0, 1, 2, 3}


def test_a_share_under_a_gib_is_refused_with_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--memory-budget of 2\.0 GiB split between 3 local nodes"):
        local_nodes(3, memory_budget=2 * GIB, gpu_memory_budget=0, total_memory=4 * GIB, cores=[0])


@given(count=st.integers(1, 12), cores=st.sets(st.integers(0, 63), min_size=1, max_size=24),
       budget=st.integers(0, 512 * GIB))
def test_local_nodes_split_the_cores_disjointly_and_the_budget_within_itself(count: int, cores: set[int],
                                                                              budget: int) -> None:
    try:
        nodes = local_nodes(count, memory_budget=budget, gpu_memory_budget=0, total_memory=64 * GIB,
                            cores=sorted(cores))
    except ConfigError:
        assert 0 < budget < count * GIB
        return
    assert len(nodes) == count
    assert sum(n.resources.get(MEMORY_RESOURCE, 0) for n in nodes) * GIB <= budget
    assert all(n.cpus and n.cpus <= cores for n in nodes)
    if len(cores) >= count:
        assert sum(len(n.cpus) for n in nodes) == len(cores) and set().union(*(n.cpus for n in nodes)) == cores
        assert max(len(n.cpus) for n in nodes) - min(len(n.cpus) for n in nodes) <= 1


def test_the_budgets_a_node_declares_replace_the_flags() -> None:
    settings = NodeSettings(limits=Limits(max_models=2, memory_budget=10 * GIB, gpu_memory_budget=5 * GIB))
    declared = settings.on_node({NODE_RESOURCE: 1, MEMORY_RESOURCE: 6, GPU_MEMORY_RESOURCE: 3})
    assert declared.limits == Limits(max_models=2, memory_budget=6 * GIB, gpu_memory_budget=3 * GIB)
    assert settings.on_node({NODE_RESOURCE: 1}) == settings


def test_without_the_ray_extra_connect_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, installed or not
    with pytest.raises(RayMissing, match=r"pip install 'modelyard\[ray\]'"):
        connect("auto")


def test_a_percentage_budget_is_of_each_nodes_own_memory_unless_the_node_declares_its_own() -> None:
    settings = NodeSettings(limits=Limits(memory_budget=8 * GIB, gpu_memory_budget=0), budget_texts=("50%", "2GiB"))
    assert settings.resolved_limits(lambda: 64 * GIB, lambda: 0).memory_budget == 32 * GIB  # this node's RAM
    assert settings.resolved_limits(lambda: 16 * GIB, lambda: 0).gpu_memory_budget == 2 * GIB
    declared = settings.on_node({NODE_RESOURCE: 1, MEMORY_RESOURCE: 6})
    assert declared.resolved_limits(lambda: 64 * GIB, lambda: 0).memory_budget == 6 * GIB  # the node's word wins
    assert NodeSettings(limits=Limits(memory_budget=5)).resolved_limits(lambda: 1, lambda: 1).memory_budget == 5
