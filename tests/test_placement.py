"""CPU placement (modelyard.placement): the pure rules as tables (topology parsing, CPU masks and ranges, what
a preset wishes, how many models are expected at once, the placement itself), the shell in-process (a
ModelManager over fake children: the placement at each load, in /models and the load's log line, freed when
a child goes), and one real-engine check: two SmolLM2 children confined to the cores /models shows."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.config.options import EngineOption, OptionTable
from modelyard.engine.command import Engine
from modelyard.manager import ModelManager
from modelyard.memory import GgufCache, GgufFacts
from modelyard.placement import (
    Core,
    Expected,
    Placement,
    Resident,
    Topology,
    Wishes,
    expected_residents,
    format_cpus,
    fully_offloaded,
    parse_cpu_list,
    parse_cpu_mask,
    parse_cpu_range,
    parse_topology,
    place,
    read_topology,
    wishes,
)
from modelyard.scheduler import Acquire, Limits, LoadSucceeded, ModelSpec, Scheduler, Status, UnloadRequested
from tests.conftest import Router
from tests.fakes import FakeClock, FakeFleet, StaticSource, app_client, settle

G = 2**30


# --- the host's cores ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("siblings", "allowed", "cores"), [
    pytest.param({0: "0", 1: "1"}, [0, 1], ((0,), (1,)), id="two-cores-no-smt"),
    pytest.param({0: "0,4", 1: "1,5", 4: "0,4", 5: "1,5"}, [0, 1, 4, 5], ((0, 4), (1, 5)), id="smt-pairs-apart"),
    pytest.param({0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"}, [0, 1, 2, 3], ((0, 1), (2, 3)), id="smt-pairs-adjacent"),
    pytest.param({0: "0,4", 1: "1,5", 4: "0,4", 5: "1,5"}, [0, 1], ((0,), (1,)), id="affinity-drops-siblings"),
    pytest.param({0: "0,4", 4: "0,4"}, [4], ((4,),), id="only-a-sibling-allowed"),
    pytest.param({}, [0, 1, 2], ((0,), (1,), (2,)), id="no-topology-each-cpu-a-core"),
    pytest.param({0: "garbage", 1: "1"}, [0, 1], ((0,), (1,)), id="malformed-siblings"),
    pytest.param({0: "0-1", 1: "1"}, [0, 1], ((0, 1),), id="a-cpu-is-in-one-core-only"),
    pytest.param({0: "0"}, [0], ((0,),), id="one-core"),
    pytest.param({}, [], (), id="nothing"),
])
def test_parse_topology(siblings: dict[int, str], allowed: list[int], cores: tuple[tuple[int, ...], ...]) -> None:
    assert parse_topology(siblings, allowed) == tuple(Core(c) for c in cores)


def test_read_topology_covers_what_this_process_may_use() -> None:
    topology = read_topology()
    assert topology.cpus == frozenset(__import__("os").sched_getaffinity(0))
    assert topology.cores and all(core.cpus == tuple(sorted(core.cpus)) for core in topology.cores)


def test_read_topology_groups_siblings_from_sysfs(tmp_path: Path) -> None:
    allowed = sorted(__import__("os").sched_getaffinity(0))
    for cpu in allowed:
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(format_cpus(allowed) + "\n")
    assert read_topology(tmp_path).cores == (Core(tuple(allowed)),)  # every allowed CPU a sibling of the first


@pytest.mark.parametrize(("text", "cpus"), [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,4", {0, 4}), ("0-1,8-9\n", {0, 1, 8, 9}), ("", None), ("a", None),
    ("3-1", None), ("1-", None), ("-1", None),
])
def test_parse_cpu_list(text: str, cpus: set[int] | None) -> None:
    assert parse_cpu_list(text) == (frozenset(cpus) if cpus is not None else None)


@pytest.mark.parametrize(("cpus", "text"), [({0}, "0"), ({0, 1, 2, 4}, "0-2,4"), ({1, 3, 5}, "1,3,5"), (set(), ""),
                                            ({8, 9, 0, 1}, "0-1,8-9")])
def test_format_cpus(cpus: set[int], text: str) -> None:
    assert format_cpus(cpus) == text
    assert not text or parse_cpu_list(text) == frozenset(cpus)


@pytest.mark.parametrize(("text", "cpus"), [
    ("1", {0}), ("0x3", {0, 1}), ("f0", {4, 5, 6, 7}), ("0X10", {4}), ("100", {8}), ("0", set()), ("zz", None),
    ("", None), ("0x", None),
])
def test_parse_cpu_mask_as_llama_cpp_reads_it(text: str, cpus: set[int] | None) -> None:
    assert parse_cpu_mask(text) == (frozenset(cpus) if cpus is not None else None)


@pytest.mark.parametrize(("text", "cpus"), [
    ("2-3", set(range(2, 4))), ("-1", {0, 1}), ("510-", {510, 511}), ("3-1", set()), ("3", None), ("a-b", None),
    ("0-512", None),
])
def test_parse_cpu_range_as_llama_cpp_reads_it(text: str, cpus: set[int] | None) -> None:
    assert parse_cpu_range(text) == (frozenset(cpus) if cpus is not None else None)


# --- what the settings wish ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "environ", "expected"), [
    pytest.param({}, {}, Wishes(), id="nothing"),
    pytest.param({"--threads": "4"}, {}, Wishes("4", "threads = 4"), id="threads"),
    pytest.param({}, {"LLAMA_ARG_THREADS": "3"}, Wishes("3", "LLAMA_ARG_THREADS=3"), id="env"),
    pytest.param({"--threads": "4"}, {"LLAMA_ARG_THREADS": "3"}, Wishes("4", "threads = 4"), id="flag-over-env"),
    pytest.param({"--threads-batch": "8"}, {}, Wishes(threads_batch="8"), id="threads-batch-alone"),
    pytest.param({"--cpu-range": "0-1"}, {}, Wishes(cpus=frozenset({0, 1}), cpus_from="cpu-range 0-1"), id="range"),
    pytest.param({"--cpu-mask": "0x4", "--cpu-range": "0-0"}, {},
                 Wishes(cpus=frozenset({0, 2}), cpus_from="cpu-mask 0x4, cpu-range 0-0"), id="mask-and-range-add-up"),
    pytest.param({"--cpu-mask": "xyz"}, {}, Wishes(cpus_from="cpu-mask xyz", cpus_invalid=True), id="bad-mask"),
])
def test_wishes(settings: dict[str, str], environ: dict[str, str], expected: Wishes) -> None:
    assert wishes(settings, environ) == expected


FACTS = [GgufFacts(tensor_bytes=100, block_count=30)]


@pytest.mark.parametrize(("settings", "facts", "gpus", "offloaded"), [
    pytest.param({}, FACTS, True, True, id="default-all-layers"),
    pytest.param({"--n-gpu-layers": "99"}, FACTS, True, True, id="99"),
    pytest.param({"--n-gpu-layers": "all"}, FACTS, True, True, id="all"),
    pytest.param({"--n-gpu-layers": "31"}, FACTS, True, True, id="every-layer-and-the-output"),
    pytest.param({"--n-gpu-layers": "20"}, FACTS, True, False, id="partial"),
    pytest.param({}, FACTS, False, False, id="no-gpu"),
    pytest.param({"--device": "none"}, FACTS, True, False, id="device-none"),
    pytest.param({"--cpu-moe": "true"}, FACTS, True, False, id="moe-on-cpu"),
    pytest.param({"--n-cpu-moe": "4"}, FACTS, True, False, id="some-moe-on-cpu"),
    pytest.param({}, [], True, False, id="facts-unknown"),
])
def test_fully_offloaded(settings: dict[str, str], facts: list[GgufFacts], gpus: bool, offloaded: bool) -> None:
    assert fully_offloaded(settings, facts, gpus) is offloaded


# --- how many models are expected at once ------------------------------------------------------------------------

def board_of(specs: list[ModelSpec], limits: Limits, events: list[Any]) -> Any:
    sched = Scheduler(specs, limits)
    for now, event in enumerate(events):
        sched.handle(event, float(now))
    return sched.board()


ABC = [ModelSpec("a"), ModelSpec("b"), ModelSpec("c")]


SIZED = [ModelSpec("a", footprint=6 * G), ModelSpec("b", footprint=6 * G), ModelSpec("c", footprint=1 * G)]
FIVE = [ModelSpec(name) for name in "abcde"]


@pytest.mark.parametrize(("specs", "limits", "events", "model", "expected"), [
    pytest.param(ABC, Limits(max_models=3), [Acquire(1, "a")], "a", Expected(3, "--models-max 3"), id="models-max"),
    pytest.param(ABC, Limits(max_models=4), [Acquire(1, "a")], "a", Expected(3, "3 models configured"),
                 id="catalog"),
    pytest.param(ABC, Limits(max_models=0), [Acquire(1, "a")], "a", Expected(3, "3 models configured"),
                 id="unlimited"),
    pytest.param(ABC, Limits(max_models=1), [Acquire(1, "a")], "a", Expected(1, "1 model running or waiting"),
                 id="swap-mode-everything"),
    pytest.param(SIZED, Limits(max_models=4, memory_budget=10 * G), [], "c",
                 Expected(2, "2 of the 3 models fit --memory-budget together"), id="memory-budget"),
    pytest.param(SIZED[:2], Limits(max_models=4, memory_budget=5 * G), [], "a",
                 Expected(1, "1 model running or waiting"), id="none-fit-but-it-runs"),
    pytest.param([*ABC, ModelSpec("d")], Limits(max_models=2),
                 [Acquire(1, "a"), Acquire(2, "b"), Acquire(3, "c"), Acquire(4, "d")], "a",
                 Expected(2, "--models-max 2"), id="waiting-models-count-up-to-models-max"),
    pytest.param([*ABC, ModelSpec("d")], Limits(max_models=3),
                 [Acquire(1, "a"), Acquire(2, "b")], "a",
                 Expected(3, "--models-max 3"), id="waiting-fewer-than-models-max"),
    pytest.param([*ABC, ModelSpec("d")], Limits(max_models=4),
                 [Acquire(1, "a"), Acquire(2, "b"), Acquire(3, "c")], "a",
                 Expected(4, "--models-max 4"), id="what-may-come-wins-over-what-waits"),
    pytest.param([ModelSpec("a"), ModelSpec("b")], Limits(max_models=1), [Acquire(1, "a"), Acquire(2, "b")], "a",
                 Expected(1, "--models-max 1"), id="models-max-1-with-another-waiting-gives-every-core"),
    pytest.param(FIVE, Limits(max_models=2), [Acquire(1, "a"), LoadSucceeded("a"), Acquire(2, "b")], "c",
                 Expected(3, "3 models running or waiting"), id="loading-and-loaded-count"),
    pytest.param(FIVE, Limits(max_models=2), [Acquire(1, "a"), LoadSucceeded("a"), Acquire(2, "b"),
                                              UnloadRequested("a")], "c",
                 Expected(2, "2 models running or waiting"), id="a-stopping-one-does-not"),
])
def test_expected_residents(specs: list[ModelSpec], limits: Limits, events: list[Any], model: str,
                            expected: Expected) -> None:
    assert expected_residents(board_of(specs, limits, events), model) == expected


# --- the placement ------------------------------------------------------------------------------------------------

def cores(*groups: tuple[int, ...]) -> Topology:
    return Topology(tuple(Core(g) for g in groups))


ONE_CORE = cores((0,))
TWO = cores((0,), (1,))
SMT4 = cores((0, 4), (1, 5), (2, 6), (3, 7))
SIXTEEN = cores(*((i,) for i in range(16)))


def r(model: str, cpus: set[int], leaving: bool = False) -> Resident:
    return Resident(model, frozenset(cpus), leaving)


def n(count: int) -> Expected:
    return Expected(count, "--models-max 3")


NONE = Wishes()
AUTO = {"--threads": "1", "--threads-batch": "1"}


@pytest.mark.parametrize(("topology", "wish", "residents", "expected", "offloaded", "threads", "cpus", "args"), [
    pytest.param(ONE_CORE, NONE, [], n(1), False, 1, "0", AUTO, id="one-core"),
    pytest.param(ONE_CORE, NONE, [r("a", {0})], n(2), False, 1, "", AUTO, id="one-core-shared"),
    pytest.param(TWO, NONE, [], n(1), False, 2, "0-1", {"--threads": "2", "--threads-batch": "2"},
                 id="two-cores-one-model"),
    pytest.param(TWO, NONE, [], n(2), False, 1, "0", AUTO, id="two-cores-first-of-two"),
    pytest.param(TWO, NONE, [r("a", {0})], n(2), False, 1, "1", AUTO, id="two-cores-second-of-two"),
    pytest.param(TWO, NONE, [], n(3), False, 1, "0", AUTO, id="two-cores-first-of-three"),
    # no core free: one thread confined to none, so the OS runs it where another child idles (pinned beside
    # one, it waited while the other core idled: the all-resident bench took 3.02 s against 2.36 s)
    pytest.param(TWO, NONE, [r("a", {0}), r("b", {1})], n(3), False, 1, "", AUTO,
                 id="two-cores-third-runs-anywhere"),
    pytest.param(TWO, NONE, [r("a", {0}), r("b", {1}), r("c", set())], n(4), False, 1, "", AUTO,
                 id="two-cores-fourth-too"),
    pytest.param(TWO, NONE, [r("a", {0, 1})], n(1), False, 1, "", AUTO,
                 id="no-core-free-one-thread-never-more"),
    pytest.param(SMT4, NONE, [], n(2), False, 2, "0-1,4-5", {"--threads": "2", "--threads-batch": "2"},
                 id="smt-a-core-comes-with-its-siblings-one-thread-per-core"),
    pytest.param(SMT4, NONE, [r("a", {0, 1, 4, 5})], n(2), False, 2, "2-3,6-7",
                 {"--threads": "2", "--threads-batch": "2"}, id="smt-second-half"),
    pytest.param(SIXTEEN, NONE, [], n(3), False, 5, "0-4", {"--threads": "5", "--threads-batch": "5"},
                 id="sixteen-cores-a-third-each"),
    pytest.param(SIXTEEN, NONE, [r("a", set(range(5)))], n(3), False, 5, "5-9",
                 {"--threads": "5", "--threads-batch": "5"}, id="sixteen-cores-second"),
    pytest.param(SIXTEEN, NONE, [r("a", set(range(5))), r("b", set(range(5, 10)))], n(3), False, 6, "10-15",
                 {"--threads": "6", "--threads-batch": "6"}, id="sixteen-cores-the-last-takes-the-rest"),
    pytest.param(TWO, NONE, [r("a", {0}, leaving=True)], n(1), False, 2, "0-1",
                 {"--threads": "2", "--threads-batch": "2"}, id="a-leaving-childs-cores-are-free"),
    pytest.param(TWO, NONE, [r("a", {0}, leaving=True)], n(2), False, 1, "1", AUTO,
                 id="but-taken-last"),
    pytest.param(TWO, NONE, [r("x", set())], n(2), False, 2, "0-1", {"--threads": "2", "--threads-batch": "2"},
                 id="an-unconfined-resident-holds-no-core"),
    pytest.param(TWO, NONE, [], n(2), True, 1, "0", AUTO, id="gpu-model-one-core"),
    pytest.param(SMT4, NONE, [], n(1), True, 2, "0,4", {"--threads": "2", "--threads-batch": "2"},
                 id="gpu-model-two-threads-on-one-smt-core"),
    pytest.param(TWO, NONE, [r("a", {0}), r("b", {1})], n(3), True, 1, "", AUTO, id="gpu-model-sharing"),
    pytest.param(TWO, Wishes("4", "threads = 4"), [r("a", {0})], n(2), False, 4, "", {},
                 id="explicit-threads-win-and-no-cpus-are-imposed"),
    pytest.param(TWO, Wishes("4", "threads = 4", threads_batch="8"), [], n(1), True, 4, "", {},
                 id="explicit-threads-win-over-the-gpu-rule"),
    pytest.param(SIXTEEN, Wishes("2", "threads = 2", cpus=frozenset({6, 7}), cpus_from="cpu-range 6-7"), [],
                 n(1), False, 2, "6-7", {}, id="explicit-threads-and-cpus-both-kept"),
    pytest.param(SIXTEEN, Wishes(cpus=frozenset({4, 5, 6, 7}), cpus_from="cpu-range 4-7"), [r("a", {4})], n(3),
                 False, 4, "4-7", {"--threads": "4", "--threads-batch": "4"},
                 id="explicit-cpus-a-thread-per-core-in-them"),
    pytest.param(SMT4, Wishes(cpus=frozenset({0, 4, 1}), cpus_from="cpu-mask 13"), [], n(1), False, 2, "0-1,4",
                 {"--threads": "2", "--threads-batch": "2"}, id="explicit-cpus-counted-in-cores"),
    pytest.param(TWO, Wishes(threads_batch="8", cpus=frozenset({1}), cpus_from="cpu-range 1-1"), [], n(1), False,
                 1, "1", {"--threads": "1"}, id="explicit-cpus-and-threads-batch"),
    pytest.param(TWO, Wishes(cpus=frozenset({7}), cpus_from="cpu-range 7-7"), [], n(1), False, None, "", {},
                 id="explicit-cpus-none-usable"),
    pytest.param(TWO, Wishes(cpus_from="cpu-mask zz", cpus_invalid=True), [], n(1), False, None, "", {},
                 id="explicit-bad-mask-left-to-llama-server"),
    pytest.param(Topology(()), NONE, [], n(1), False, None, "", {}, id="no-cores-known"),
])
def test_place(topology: Topology, wish: Wishes, residents: list[Resident], expected: Expected, offloaded: bool,
               threads: int | None, cpus: str, args: dict[str, str]) -> None:
    placement = place(topology, wish, residents, expected, offloaded)
    assert (placement.threads, format_cpus(placement.cpus), dict(placement.args)) == (threads, cpus, args)
    assert placement.reason


@pytest.mark.parametrize(("topology", "wish", "residents", "expected", "offloaded", "reason"), [
    pytest.param(TWO, NONE, [], n(3), False, "1 thread on CPU 0: 1 core of 2 of its own, 3 models may be resident at "
                                             "once (--models-max 3)", id="own-cores"),
    pytest.param(TWO, NONE, [r("a", {0}), r("b", {1})], n(3), False,
                 "1 thread on any CPU: each of the 2 cores already runs a model (--models-max 3), so it is left "
                 "free to run where one idles", id="shared"),
    pytest.param(ONE_CORE, NONE, [], n(1), False, "1 thread on CPU 0: the only core", id="only-core"),
    pytest.param(TWO, NONE, [], n(1), True, "1 thread on CPU 0: wholly offloaded to the GPU, its CPU work is light",
                 id="gpu"),
    pytest.param(TWO, Wishes("4", "threads = 4"), [], n(1), False,
                 "threads = 4 set for it: its threads are left as given, on any CPU", id="explicit"),
    pytest.param(TWO, Wishes("1", "LLAMA_ARG_THREADS=1", cpus=frozenset({1}), cpus_from="cpu-range 1-1"), [], n(1),
                 False, "LLAMA_ARG_THREADS=1 set for it: its threads are left as given, on CPUs 1 (cpu-range 1-1)",
                 id="explicit-both"),
    pytest.param(Topology(TWO.cores, can_pin=False), NONE, [], n(1), False,
                 "2 threads on CPUs 0-1: 2 cores of 2 of its own, 1 model may be resident at once (--models-max 3); "
                 "this OS cannot confine it to them", id="cannot-pin"),
])
def test_each_placement_says_why(topology: Topology, wish: Wishes, residents: list[Resident], expected: Expected,
                                 offloaded: bool, reason: str) -> None:
    assert place(topology, wish, residents, expected, offloaded).reason == reason


def test_the_resident_set_changing_between_loads() -> None:
    """Loads one after the other on 2 cores with three models expected: each keeps what it got (never moved);
    a model that leaves frees its core for the next."""
    held: dict[str, Placement] = {}

    def load(model: str) -> str:
        residents = [Resident(name, p.cpus) for name, p in held.items()]
        held[model] = place(TWO, NONE, residents, n(3), False)
        return format_cpus(held[model].cpus)

    assert [load("a"), load("b"), load("c")] == ["0", "1", ""]  # c: no core free, confined to none
    del held["b"]  # b is unloaded
    assert load("d") == "1"
    del held["a"]
    assert load("e") == "0"  # c holds no core: e has the first to itself
    assert {m: format_cpus(p.cpus) for m, p in held.items()} == {"c": "", "d": "1", "e": "0"}


@settings(max_examples=200, deadline=None)
@given(n_cores=st.integers(1, 8), smt=st.integers(1, 2), expected=st.integers(1, 10),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 9), st.booleans()), max_size=40))
def test_random_loads_and_unloads_keep_children_off_each_others_cores(
        n_cores: int, smt: int, expected: int, ops: list[tuple[bool, int, bool]]) -> None:
    """Loads (some wholly on a GPU) and unloads in any order, never more models at once than expected: with
    no more models than cores no two share a core, and every child has one thread per core it holds (a GPU
    child: one core, a thread per CPU of it, at most two); a child placed when no core was free has one thread
    and no core of its own."""
    topology = Topology(tuple(Core(tuple(core + n_cores * i for i in range(smt))) for core in range(n_cores)))
    held: dict[int, Placement] = {}
    for load, pick, gpu in ops:
        if load and len(held) < expected and pick not in held:
            residents = [Resident(str(m), p.cpus) for m, p in held.items()]
            held[pick] = place(topology, NONE, residents, Expected(expected, "test"), gpu)
        elif not load:
            held.pop(pick, None)
        for placement in held.values():
            if not placement.cpus:  # placed when no core was free
                assert placement.threads == 1, placement
                continue
            owned = [core for core in topology.cores if placement.cpus & set(core.cpus)]
            assert placement.cpus == frozenset(cpu for core in owned for cpu in core.cpus), placement
            assert placement.threads is not None and 1 <= placement.threads <= len(placement.cpus), placement
            assert placement.threads == len(owned) or (len(owned) == 1 and placement.threads <= 2), placement
        sets = [p.cpus for p in held.values()]  # no two children confined to one core
        assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:]), held
        if expected <= n_cores:
            assert all(p.cpus for p in held.values()), held


# --- the shell, in-process ----------------------------------------------------------------------------------------

TABLE = OptionTable([EngineOption(("-t", "--threads"), env=("LLAMA_ARG_THREADS",), takes_value=True),
                     EngineOption(("-tb", "--threads-batch"), takes_value=True),
                     EngineOption(("-Cr", "--cpu-range"), takes_value=True)])


def llama_models(settings: Mapping[str, Mapping[str, str]], cmd: tuple[str, ...] = ()) -> Catalog:
    models = {name: ModelConfig(name=name, settings=dict(values), source="preset", origin="test")
              for name, values in settings.items()}
    models.update({name: ModelConfig(name=name, settings={}, source="preset", origin="test", command=f"fake {name}")
                   for name in cmd})
    return Catalog(models=models, by_name={name: name for name in models})


class Rig:
    def __init__(self, manager: ModelManager, fleet: FakeFleet) -> None:
        self.manager, self.fleet = manager, fleet

    async def load(self, model: str, number: int = 1) -> None:
        self.manager.load_in_background(model)
        child = await self.fleet.child(model, number)
        child.become_ready()
        await settle()
        assert self.manager.status_of(model) == Status.LOADED


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.delenv("LLAMA_ARG_THREADS", raising=False)
    clock = FakeClock()
    fleet = FakeFleet(clock)
    source = StaticSource(llama_models({"a": {}, "b": {}, "c": {}, "d": {}, "mine": {"--threads": "3"}},
                                       cmd=("other",)))
    manager = ModelManager(source, Engine(Path("/opt/llama-server"), TABLE), catalog=source.value,
                           limits=Limits(max_models=3, max_wait=30.0), clock=clock, gguf_cache=GgufCache(tmp_path),
                           child_factory=fleet, topology=TWO)
    await manager.start()
    try:
        yield Rig(manager, fleet)
    finally:
        await manager.close()


async def test_each_load_is_placed_off_the_others_cores_and_shows_in_models(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelyard.manager")
    for model in ("a", "b", "c"):
        await rig.load(model)
    plans = {m: rig.fleet.children[m][0].plan for m in ("a", "b", "c")}
    assert {m: (sorted(p.cpus), p.argv[p.argv.index("--threads") + 1]) for m, p in plans.items()} == \
        {"a": ([0], "1"), "b": ([1], "1"), "c": ([], "1")}
    assert "--threads-batch" in plans["a"].argv
    assert any(rec.getMessage().startswith("loading a: 1 request(s) waiting; 1 thread on CPU 0: 1 core of 2 of its "
                                           "own, 3 models may be resident at once (--models-max 3)")
               for rec in caplog.records)
    client = await app_client(rig.manager)
    try:
        listing = {m["id"]: m for m in (await (await client.get("/models")).json())["data"]}
    finally:
        await client.close()
    assert listing["a"]["placement"] == {"threads": 1, "threads_batch": 1, "cpus": "0",
                                         "reason": "1 thread on CPU 0: 1 core of 2 of its own, 3 models may be "
                                                   "resident at once (--models-max 3)"}
    assert listing["c"]["placement"]["cpus"] is None  # confined to none
    assert listing["c"]["placement"]["reason"].startswith("1 thread on any CPU: each of the 2 cores already runs")
    assert listing["d"]["placement"] is None  # not running

    rig.manager.unload("b")  # b's core is free again, and the next load takes it
    await settle()
    assert rig.manager.status_of("b") == Status.UNLOADED
    await rig.load("d")
    assert sorted(rig.fleet.children["d"][0].plan.cpus) == [1]
    assert [v.placement for v in rig.manager.models() if v.config.name == "b"] == [None]


async def test_explicit_threads_and_other_engines_are_left_alone(rig: Rig) -> None:
    await rig.load("mine")
    plan = rig.fleet.children["mine"][0].plan
    assert plan.cpus == frozenset() and plan.argv.count("--threads") == 1
    assert plan.argv[plan.argv.index("--threads") + 1] == "3" and "--threads-batch" not in plan.argv
    await rig.load("other")
    assert rig.fleet.children["other"][0].plan.cpus == frozenset()
    views = {v.config.name: v.placement for v in rig.manager.models()}
    assert views["other"] is None
    assert views["mine"] is not None and views["mine"].threads == 3 and views["mine"].reason.startswith("threads = 3")


# --- one real-engine check ----------------------------------------------------------------------------------------

def _allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _alias(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"--alias") + 1].decode()


def test_two_llama_server_children_run_on_the_cores_models_shows(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir), "--models-max", "2", "-c", "2048")
    for model in ("smol", "smol-b"):
        assert router.client.post("/models/load", json={"model": model}).status_code == 200
    for model in ("smol", "smol-b"):
        router.wait_status(model, "loaded")
    listing = {m["id"]: m for m in router.client.get("/models").json()["data"]}
    shown = {model: listing[model]["placement"] for model in ("smol", "smol-b")}
    deadline = time.monotonic() + 10
    while len(router.children()) < 2:
        assert time.monotonic() < deadline, "two children expected"
        time.sleep(0.05)
    actual = {_alias(pid): _allowed_cpus(pid) for pid in router.children()}
    assert actual == {model: placement["cpus"] for model, placement in shown.items()}
    for model, placement in shown.items():
        args = listing[model]["status"]["args"]
        assert args[args.index("--threads") + 1] == str(placement["threads"])
    if len(read_topology().cores) >= 2:  # two models expected at once (--models-max 2): a core each, apart
        sets = [parse_cpu_list(p["cpus"]) or frozenset() for p in shown.values()]
        assert sets[0] and sets[1] and not sets[0] & sets[1], shown
