"""The llama-server flags modelyard gives its children where neither the model's preset nor the router's command
line sets them: each shortens a load without moving its cost onto the first request, as measured here
(llama-server b11434, the demo Gemma 3 270M, `-c 2048 --threads 1`, 2-core Xeon, warm page cache, median of 6
interleaved rounds: start to /health 200, then the first and second requests' first streamed token):

    default              1198 ms   first request 142 ms   second 62 ms
    --no-warmup          1038 ms                 138 ms          58 ms
    --fit off             562 ms                 143 ms          55 ms
    both                  533 ms                 134 ms          57 ms
    --no-repack          1041 ms                 138 ms          64 ms   (not kept: within the noise, and
                                                                          repacking speeds every token after)

`--fit on` (llama-server's default) measures the model against free device memory before loading it, which reads
the model's metadata and vocabulary a second time ("fitting params to free memory took 0.45 seconds"); with the
context given and nothing to offload it changes nothing ("no changes needed"). The warm-up is an empty run whose
work the first request does not redo."""

from __future__ import annotations

from collections.abc import Mapping

WARMUP, FIT, CTX_SIZE = "--warmup", "--fit", "--ctx-size"


def child_defaults(settings: Mapping[str, str], gpus: bool) -> dict[str, str]:
    """`settings` (canonical flag -> value, as a child is launched with them) with modelyard's defaults added
    where unset: no warm-up run, and `--fit off` where fitting has nothing to decide: the context is set (by
    the preset, or by modelyard to fit the memory budget) and no GPU is there to offload to (on a GPU, fit also
    chooses the offloaded layers). An explicit setting always wins, `--fit on` included."""
    chosen = dict(settings)
    chosen.setdefault(WARMUP, "false")
    if FIT not in chosen and not gpus and _positive(chosen.get(CTX_SIZE)):
        chosen[FIT] = "off"
    return chosen


def _positive(value: str | None) -> bool:
    try:
        return int(value or 0) > 0
    except ValueError:
        return False
