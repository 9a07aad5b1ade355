"""CPU placement: how many threads each llama-server child gets and which cores it runs on, so that children
resident at once keep off each other's cores. ggml's threads spin while they wait for each other, so two
children whose threads share cores slow each other down 3 to 20 times (measured on 2 cores, issue 12); a
child that shares a core with another must have one thread, and a child of several threads needs cores of
its own.

These are pure rules, applied when a load starts (the shell runs `place` as it executes the scheduler's
StartLoad, from the scheduler's board and the CPU sets of the children it runs): the host's cores
(`Topology`, read once at start by `read_topology`: SMT siblings grouped into physical cores, only the CPUs
modelyard may use), the children already running and whether they are leaving, how many models are likely to
be resident at once (`expected_residents`), whether the model runs wholly on a GPU (`fully_offloaded`) and
what its own settings say (`Wishes`). The answer (`Placement`) is the child's `--threads`/`--threads-batch`,
the CPU set it is confined to, and a sentence for /models and the log. A running child is never moved or
restarted to rebalance: its thread count is fixed when it starts. A preset's (or the router command line's,
or LLAMA_ARG_THREADS') explicit `threads` always wins: then modelyard sets nothing, unless the preset names
CPUs too (`cpu-mask`/`cpu-range`), which are then kept to.

The CPU set is applied by the shell as the child's affinity, set between fork and exec (children.py), not
with llama-server's own `--cpu-mask`/`--cpu-range`: those pin only ggml's compute threads, and in an OpenMP
build (the default, and modelyard's) not at all with one thread, since ggml applies the mask inside the
OpenMP parallel region, which a single thread never enters. An affinity set before exec holds for every
thread of the child from its first instruction, and libgomp sizes its spin-waits to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config.options import TRUTHY, explicit_setting
from modelyard.memory import GgufFacts, offloaded_share
from modelyard.scheduler import Board, Status

_MAX_CPUS = 512  # GGML_MAX_N_THREADS: the CPUs a llama.cpp mask or range can name
_GPU_THREADS = 2  # a wholly offloaded model's CPU work is sampling and the odd op: one core, two threads at most
_SYSFS_CPUS = Path("/sys/devices/system/cpu")


# --- the host's cores -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Core:
    """One physical core: its logical CPUs (SMT siblings), ascending."""

    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    """The physical cores modelyard may place children on, by their first CPU; `can_pin`: the OS lets it set a
    child's CPU affinity (Linux). Without it, cores are still assigned (so that thread counts come from the
    same shares) but the shell confines no child to them."""

    cores: tuple[Core, ...]
    can_pin: bool = True

    @property
    def cpus(self) -> frozenset[int]:
        return frozenset(cpu for core in self.cores for cpu in core.cpus)


def parse_cpu_list(text: str) -> frozenset[int] | None:
    """The kernel's CPU list format (`0-3,8,10-11`, as in thread_siblings_list); None if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            return None
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            return None
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 4} -> `0-2,4`: the kernel's list format, as /proc/<pid>/status shows Cpus_allowed_list."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{low}" if low == high else f"{low}-{high}" for low, high in runs)


def parse_topology(siblings: Mapping[int, str], allowed: Iterable[int]) -> tuple[Core, ...]:
    """Physical cores from each CPU's `thread_siblings_list` (`siblings`, by CPU) restricted to the CPUs this
    process may run on (`allowed`, its affinity). A CPU whose siblings are missing or malformed is a core of
    its own; a CPU is in one core only, the first that names it."""
    usable = set(allowed)
    taken: set[int] = set()
    cores: list[Core] = []
    for cpu in sorted(usable):
        if cpu in taken:
            continue
        group = parse_cpu_list(siblings.get(cpu, "")) or frozenset()
        members = (set(group) & usable | {cpu}) - taken
        taken |= members
        cores.append(Core(tuple(sorted(members))))
    return tuple(cores)


def read_topology(root: Path = _SYSFS_CPUS) -> Topology:
    """The cores of this host that modelyard may use (its own affinity: a cgroup's cpuset or taskset counts),
    read once at start."""
    can_pin = hasattr(os, "sched_setaffinity")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    siblings: dict[int, str] = {}
    for cpu in allowed:
        try:
            siblings[cpu] = (root / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
        except OSError:
            continue  # no topology (not Linux, or an offline CPU): a core of its own
    return Topology(parse_topology(siblings, allowed), can_pin=can_pin)


# --- what the model's own settings say ----------------------------------------------------------------------

def parse_cpu_mask(text: str) -> frozenset[int] | None:
    """llama.cpp's `--cpu-mask`: hex digits (optional 0x), the last digit CPUs 0-3; None if not hex."""
    digits = text.strip()
    digits = digits[2:] if digits[:2].lower() == "0x" else digits
    digits = digits[:_MAX_CPUS // 4]  # llama.cpp reads at most 128 digits
    try:
        value = int(digits, 16) if digits else None
    except ValueError:
        return None
    if value is None:
        return None
    return frozenset(bit for bit in range(value.bit_length()) if value >> bit & 1)


def parse_cpu_range(text: str) -> frozenset[int] | None:
    """llama.cpp's `--cpu-range lo-hi` (either end may be left out: from 0, to the last CPU); None if
    malformed or out of llama.cpp's bounds."""
    low, dash, high = text.strip().partition("-")
    if not dash or (low and not low.isdigit()) or (high and not high.isdigit()):
        return None
    first, last = int(low or 0), int(high) if high else _MAX_CPUS - 1
    if first >= _MAX_CPUS or last >= _MAX_CPUS:
        return None
    return frozenset(range(first, last + 1))


@dataclass(frozen=True)
class Wishes:
    """What the model's effective settings (router command line > model section > `[*]`) and the router's
    environment say about threads and CPUs."""

    threads: str | None = None  # `threads` as given (`-t`, `--threads`, LLAMA_ARG_THREADS)
    threads_from: str = ""  # where: "threads = 4", "LLAMA_ARG_THREADS=4"
    threads_batch: str | None = None
    cpus: frozenset[int] | None = None  # the CPUs its cpu-mask / cpu-range name together
    cpus_from: str = ""  # how: "cpu-range 0-3"
    cpus_invalid: bool = False  # a cpu-mask or cpu-range llama-server will refuse


def wishes(settings: Mapping[str, str], environ: Mapping[str, str]) -> Wishes:
    """`settings`: the model's, by canonical flag. llama-server reads LLAMA_ARG_THREADS when no `--threads`
    is given, and children inherit the router's environment, so it counts as an explicit choice."""
    threads: str | None
    threads, threads_from = explicit_setting(settings, "--threads", environ, ("LLAMA_ARG_THREADS",)) or (None, "")
    named: list[str] = []
    cpus: set[int] = set()
    invalid = False
    for flag, parse in (("--cpu-mask", parse_cpu_mask), ("--cpu-range", parse_cpu_range)):
        value = settings.get(flag)
        if value is None:
            continue
        named.append(f"{flag.lstrip('-')} {value}")
        parsed = parse(value)
        if parsed is None:
            invalid = True
        else:
            cpus |= parsed  # llama.cpp: they "complement" each other (one mask, both set bits)
    return Wishes(threads, threads_from, settings.get("--threads-batch"),
                  frozenset(cpus) if named and not invalid else None, ", ".join(named), invalid)


def fully_offloaded(settings: Mapping[str, str], facts: Sequence[GgufFacts], gpus: bool) -> bool:
    """Whether every layer of the model runs on a GPU (memory.offloaded_share, the estimate's rule) with no
    MoE or FFN weights kept on the CPU: then its CPU threads have little to do."""
    if not gpus or not facts or offloaded_share(settings, facts[0]) < 1.0:
        return False
    kept = (settings.get("--cpu-moe", "false").lower() in TRUTHY
            or any(_int(settings.get(flag)) > 0 for flag in ("--n-cpu-moe", "--n-cpu-ffn")))
    return not kept


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


# --- how many models are likely to be resident at once --------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """How many models are likely to be resident at once, counting the one loading, and what says so."""

    count: int
    why: str


def expected_residents(board: Board, model: str) -> Expected:
    """The larger of what runs or waits now (loading and loaded models, `model` included, and the distinct
    models waiting for a load, but no more than may run at once) and what may come: as many models as
    --models-max lets run, as the catalog holds and as fit --memory-budget together (the smallest first).
    Threads are fixed when a child starts and a first model cannot know whether others will join it, so the
    share is kept for those that may: a model used alone while others could load beside it gets its share, not
    every core (set `threads`, or a lower --models-max, to give it more)."""
    running = {name for name, m in board.models.items() if m.status in (Status.LOADING, Status.LOADED)}
    running.add(model)
    waiting = {w.model for w in board.queue if w.model in board.models
               and board.models[w.model].status in (Status.UNLOADED, Status.FAILED)} - running
    now = len(running) + len(waiting)
    limits, total = board.limits, len(board.models)
    slots = limits.max_models if limits.max_models > 0 else total
    fit = _fitting(sorted(m.room.memory for m in board.models.values()), limits.memory_budget)
    likely = min(slots, total, fit)
    # More waiting than may run at once: only `likely` of them will be resident together (the rest load as
    # others leave, onto the cores those free). Counting them all gave a child started under --models-max 1,
    # while a second model waited, half the cores for its whole life, the other half idle (found in review).
    capped = max(len(running), likely)
    if now >= likely and now <= capped:
        return Expected(now, f"{now} model{'s' if now != 1 else ''} running or waiting")
    if now > capped > likely:  # more already run than the limits foresee (none fits the budget, say)
        return Expected(capped, f"{capped} model{'s' if capped != 1 else ''} running")
    if likely == slots and limits.max_models > 0:
        return Expected(likely, f"--models-max {slots}")
    if likely == fit and fit < total:
        return Expected(likely, f"{fit} of the {total} models fit --memory-budget together")
    return Expected(likely, f"{total} models configured")


def _fitting(sizes: list[int], budget: int) -> int:
    """How many of `sizes` (ascending) fit in `budget` together (0 = no budget: all)."""
    if budget <= 0:
        return len(sizes)
    used = count = 0
    for size in sizes:
        used += size
        if used > budget:
            break
        count += 1
    return count


# --- the rule -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resident:
    """A child running now (loading, loaded, or leaving: stopping) and the CPUs it is confined to (none: not
    confined)."""

    model: str
    cpus: frozenset[int] = frozenset()
    leaving: bool = False


@dataclass(frozen=True)
class Placement:
    """What a child is started with: its threads (None: as the engine decides) and the CPUs it is given
    (empty: any; the shell confines it to them where the OS can), the flags modelyard adds to its settings
    (canonical flag -> value), and why."""

    threads: int | None
    threads_batch: int | None
    cpus: frozenset[int]
    reason: str
    args: Mapping[str, str] = field(default_factory=dict)


def place(topology: Topology, wish: Wishes, residents: Sequence[Resident], expected: Expected,
          offloaded: bool) -> Placement:
    """The placement of a child about to start (see the module's docstring): a CPU model gets a share of the
    free physical cores (free cores over it and the models still expected to join, at least one), one thread
    per core; with no core free, one thread confined to no core (the OS moves it to an idle one); a wholly
    offloaded model, one
    core and at most two threads. Cores of leaving children count as free, but are taken last."""
    if wish.threads is not None:
        return _as_given(topology, wish)
    if wish.cpus_invalid:
        return Placement(None, None, frozenset(), f"its {wish.cpus_from} is not a CPU mask or range llama-server "
                                                  f"takes: left to llama-server")
    if wish.cpus is not None:
        return _within_given(topology, wish)
    cores = topology.cores
    if not cores:
        return Placement(None, None, frozenset(), "no CPU to place it on was found: left to llama-server")
    staying = [r for r in residents if not r.leaving]
    load = [sum(1 for r in staying if r.cpus & set(core.cpus)) for core in cores]
    leaving = [sum(1 for r in residents if r.leaving and r.cpus & set(core.cpus)) for core in cores]
    free = sorted((i for i in range(len(cores)) if load[i] == 0), key=lambda i: (leaving[i], i))
    joining = max(0, expected.count - 1 - len(staying))  # models still expected after this one
    if not free:
        # One thread, confined to no core: pinned beside another child it could not move when the other cores
        # idle (the all-resident bench, 3 models on 2 cores: 3.02 s pinned, 2.36 s with every child free).
        return Placement(1, 1, frozenset(), f"1 thread on any CPU: each of the {len(cores)} cores already runs a "
                         f"model ({expected.why}), so it is left free to run where one idles",
                         {"--threads": "1", "--threads-batch": "1"})
    chosen = free[:1] if offloaded else free[:max(1, len(free) // (joining + 1))]
    cpus = frozenset(cpu for i in chosen for cpu in cores[i].cpus)
    threads = min(_GPU_THREADS, len(cpus)) if offloaded else len(chosen)
    where = f"{_plural(threads, 'thread')} on CPU{'s' if len(cpus) > 1 else ''} {format_cpus(cpus)}"
    if offloaded:
        reason = f"{where}: wholly offloaded to the GPU, its CPU work is light"
    elif len(cores) == 1:
        reason = f"{where}: the only core"
    else:
        reason = (f"{where}: {_plural(len(chosen), 'core')} of {len(cores)} of its own, {expected.count} "
                  f"model{'s' if expected.count != 1 else ''} may be resident at once ({expected.why})")
    if not topology.can_pin:
        reason += "; this OS cannot confine it to them"
    return Placement(threads, threads, cpus, reason, {"--threads": str(threads), "--threads-batch": str(threads)})


def _as_given(topology: Topology, wish: Wishes) -> Placement:
    """Explicit threads: nothing added; confined to the CPUs the settings name, if they name some."""
    threads = _int(wish.threads) or None
    batch = _int(wish.threads_batch) or threads
    cpus = _usable(topology, wish)
    reason = f"{wish.threads_from} set for it: its threads are left as given"
    if wish.cpus_from:
        reason += (f", on CPUs {format_cpus(cpus)} ({wish.cpus_from})" if cpus
                   else f"; its {wish.cpus_from} names no CPU modelyard can confine it to")
    else:
        reason += ", on any CPU"
    return Placement(threads, batch, cpus, reason)


def _within_given(topology: Topology, wish: Wishes) -> Placement:
    """CPUs named, no threads: one thread per physical core among them (llama-server would start one per
    core of the machine, more than the mask holds)."""
    cpus = _usable(topology, wish)
    if not cpus:
        return Placement(None, None, frozenset(), f"its {wish.cpus_from} names no CPU modelyard can use: "
                                                  f"left to llama-server")
    threads = sum(1 for core in topology.cores if cpus & set(core.cpus))
    args = {"--threads": str(threads)}
    if wish.threads_batch is None:
        args["--threads-batch"] = str(threads)
    batch = _int(wish.threads_batch) or threads
    reason = f"{_plural(threads, 'thread')} on CPUs {format_cpus(cpus)}, as its {wish.cpus_from} names them"
    return Placement(threads, batch, cpus, reason, args)


def _usable(topology: Topology, wish: Wishes) -> frozenset[int]:
    return wish.cpus & topology.cpus if wish.cpus is not None else frozenset()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"
