"""The watchdog's decision: is a loaded child wedged? A pure function of what the shell observed.

llama.cpp users report children that answer /health but stall every inference, and a `kill -STOP`ped child
hung its requests for ever. So a child is judged unhealthy when it fails its health probe several times in a
row, or when it has requests in flight and has sent no byte on any of them for the stall timeout, and in
either case shows no progress: its main thread's CPU time did not move since the previous round. A long
non-streamed generation, or one long prompt step, sends nothing for minutes while that time moves; a child
whose HTTP threads are all busy may miss its probes while it works (both were killed by earlier rules).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WatchdogSettings:
    stall_timeout: float = 120.0  # seconds without a byte on any in-flight request; 0 = never judged stalled
    interval: float = 10.0  # seconds between rounds of probes
    probe_timeout: float = 10.0  # a probe not answered within this failed
    failed_probes: int = 3  # this many failed probes in a row: unhealthy

    @classmethod
    def for_stall_timeout(cls, stall_timeout: float) -> WatchdogSettings:
        """Probe often enough that a stall is caught within about a quarter of its timeout past it."""
        step = min(10.0, max(0.5, stall_timeout / 4)) if stall_timeout else 10.0
        return cls(stall_timeout=stall_timeout, interval=step, probe_timeout=step)


@dataclass(frozen=True)
class Observation:
    in_flight: int  # requests the child is answering now
    silent_for: float  # seconds since its last byte on any request (or since the oldest request began)
    probe_ok: bool  # it answered the health probe just now
    failed_probes: int  # failed probes in a row, this one included
    progressed: bool  # its main thread used CPU since the previous round


def judge(seen: Observation, settings: WatchdogSettings) -> str:
    """Why the child is unhealthy, or "" if it is not."""
    if not seen.probe_ok and seen.failed_probes >= settings.failed_probes and not seen.progressed:
        return (f"no answer to {seen.failed_probes} health checks in a row "
                f"({settings.probe_timeout:g} s each)")
    if (seen.in_flight and settings.stall_timeout and seen.silent_for >= settings.stall_timeout
            and not seen.progressed):  # a probe that failed shows no progress either: wedged
        return (f"sent no byte on {seen.in_flight} request(s) for {seen.silent_for:.0f} s "
                f"(stall-timeout {settings.stall_timeout:g} s)")
    return ""
