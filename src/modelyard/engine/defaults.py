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
context given and nothing to offload it changes nothing ("no changes needed"). On a GPU it also chooses how many
layers to offload, so it is turned off only where the child can use no GPU: not merely where nvidia-smi finds
none (Metal, ROCm and Vulkan builds, or CUDA without nvidia-smi, offload too, and without fit a model too big for
the GPU may fail to load). The warm-up is an empty run whose work the first request does not redo."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from modelyard.config.options import OptionTable, explicit_setting

WARMUP, FIT, CTX_SIZE = "--warmup", "--fit", "--ctx-size"
GPU_LAYERS, DEVICE = "--n-gpu-layers", "--device"


def child_defaults(settings: Mapping[str, str], environ: Mapping[str, str], options: OptionTable,
                   cpu_build: bool) -> dict[str, str]:
    """`settings` (canonical flag -> value, as a child is launched with them) with modelyard's defaults added
    where neither they nor the environment the child inherits (the option's variable in `options`, such as
    LLAMA_ARG_FIT) set them: no warm-up run, and `--fit off` where fitting has nothing to decide: the context
    is set (by the preset, or by modelyard to fit the memory budget) and the child can use no GPU
    (`_uses_no_gpu`; `cpu_build`: its binary is modelyard's own CPU build, engine.install.is_cpu_build). An
    explicit setting always wins, `--fit on` included."""
    def given(flag: str) -> str | None:
        found = explicit_setting(settings, flag, environ, options.env_of(flag))
        return found[0] if found is not None else None

    chosen = dict(settings)
    if given(WARMUP) is None:
        chosen[WARMUP] = "false"
    if given(FIT) is None and _whole(given(CTX_SIZE)) > 0 and _uses_no_gpu(given, cpu_build):
        chosen[FIT] = "off"
    return chosen


def _uses_no_gpu(given: Callable[[str], str | None], cpu_build: bool) -> bool:
    """Whether a child can use no GPU: its binary has no GPU backend (`cpu_build`), or it offloads nothing
    (`given(flag)`, its setting or variable: n-gpu-layers 0, or device none)."""
    device = given(DEVICE)
    return cpu_build or _whole(given(GPU_LAYERS)) == 0 or (device is not None and device.strip().lower() == "none")


def _whole(value: str | None) -> int:
    """A whole number of a setting; -1 for unset or anything else (auto, all, a typo)."""
    try:
        return int(value) if value is not None else -1
    except ValueError:
        return -1
