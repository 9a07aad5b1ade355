"""Footprint estimates (host and GPU), sizes, and reading nvidia-smi (a stand-in script on PATH: this
machine has no GPU)."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest

from modelyard.memory import (
    Footprint,
    GgufFacts,
    estimate_footprint,
    fitted_footprint,
    gpu_memory_by_pid,
    gpu_total_memory,
    kv_cache_bytes,
    offloaded_share,
    parse_size,
    read_gguf,
)

MiB = 2**20
# 24 layers, 2 KV heads of 64 + 64: 24 * 2 * 128 * 2 bytes = 12 KiB of f16 KV cache per token
FACTS = GgufFacts(tensor_bytes=1000 * MiB, architecture="llama", context_length=8192, block_count=24,
                  head_count_kv=2, key_length=64, value_length=64)
KV_4096 = 4096 * 12 * 1024
MARGIN = 64 * MiB + 1000 * MiB // 20


def test_host_only_estimate_is_weights_kv_and_margin() -> None:
    assert estimate_footprint({"--ctx-size": "4096"}, [FACTS]) == Footprint(1000 * MiB + KV_4096 + MARGIN)
    q8 = estimate_footprint({"--ctx-size": "4096", "--cache-type-k": "q8_0", "--cache-type-v": "q8_0"}, [FACTS])
    assert q8.memory == 1000 * MiB + int(KV_4096 * 34 / 32 / 2) + MARGIN
    assert estimate_footprint({}, []) == Footprint()


def test_with_a_gpu_every_layer_and_its_kv_cache_is_offloaded_by_default() -> None:
    footprint = estimate_footprint({"--ctx-size": "4096"}, [FACTS], gpu=True)
    assert footprint.gpu == 1000 * MiB + KV_4096 + MARGIN
    assert footprint.memory == 64 * MiB  # host-side buffers only


def test_partial_offload_splits_weights_and_kv_by_layers() -> None:
    footprint = estimate_footprint({"--ctx-size": "4096", "--n-gpu-layers": "5"}, [FACTS], gpu=True)
    share = 5 / 25  # 24 repeating layers + the output layer
    assert footprint.gpu == int((1000 * MiB + KV_4096) * share) + MARGIN
    assert footprint.memory + footprint.gpu == 1000 * MiB + KV_4096 + MARGIN + 64 * MiB


def test_kv_cache_stays_on_the_host_with_no_kv_offload() -> None:
    footprint = estimate_footprint({"--ctx-size": "4096", "--kv-offload": "false"}, [FACTS], gpu=True)
    assert footprint.gpu == 1000 * MiB + MARGIN
    assert footprint.memory == KV_4096 + 64 * MiB


@pytest.mark.parametrize(("settings", "share"), [
    ({}, 1.0), ({"--n-gpu-layers": "all"}, 1.0), ({"--n-gpu-layers": "auto"}, 1.0), ({"--n-gpu-layers": "-1"}, 1.0),
    ({"--n-gpu-layers": "0"}, 0.0), ({"--n-gpu-layers": "99"}, 1.0), ({"--device": "none"}, 0.0),
])
def test_offloaded_share(settings: dict[str, str], share: float) -> None:
    assert offloaded_share(settings, FACTS) == share


def test_no_offload_means_a_host_only_estimate() -> None:
    assert estimate_footprint({"--n-gpu-layers": "0", "--ctx-size": "4096"}, [FACTS], gpu=True) == \
        estimate_footprint({"--ctx-size": "4096"}, [FACTS])


@pytest.mark.parametrize(("text", "size"), [
    ("16GiB", 16 * 2**30), ("512MiB", 512 * MiB), ("1234567", 1234567), ("2G", 2 * 10**9), ("50%", 500), ("0", 0),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, 1000) == size


def test_parse_size_says_what_to_send() -> None:
    with pytest.raises(ValueError, match="use bytes, 16GiB"):
        parse_size("lots", 1000)


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two GPUs of 8 GiB; process 4242 uses 1000 MiB on one and 24 MiB on the other."""
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\ncase \"$1\" in\n"
                      "--query-gpu=memory.total) printf '8192\\n8192\\n' ;;\n"
                      "--query-compute-apps=pid,used_memory) printf '4242, 1000\\n4242, 24\\n77, 5\\n' ;;\n"
                      "esac\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.usefixtures("fake_nvidia_smi")
def test_reads_gpu_memory_from_nvidia_smi() -> None:
    assert gpu_total_memory() == 16 * 2**30
    assert asyncio.run(gpu_memory_by_pid()) == {4242: 1024 * MiB, 77: 5 * MiB}


def test_without_nvidia_smi_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_total_memory() == 0
    assert asyncio.run(gpu_memory_by_pid()) == {}


@functools.cache
def _facts(path: Path) -> GgufFacts:
    return read_gguf(path)  # seconds for a big vocabulary: once per file


@pytest.mark.parametrize(("model", "settings", "mib"), [
    # llama-server b11434's own "llama_kv_cache: size = ..." lines for the demo models (-v)
    ("smollm2-135m-instruct", {}, 180.0),
    ("smollm2-135m-instruct", {"--ctx-size": "4096", "--parallel": "2", "--cache-type-k": "q8_0",
                               "--cache-type-v": "q8_0"}, 47.81),
    ("gemma3-270m", {}, 96.0 + 37.5),  # 3 full layers x 32768 cells + 15 sliding ones x (512 x 4 slots + 512)
    ("gemma3-270m", {"--ctx-size": "4096", "--parallel": "2"}, 12.0 + 30.0),
    ("gemma3-270m", {"--swa-full": "true"}, 96.0 + 480.0),
    ("gemma3-270m", {"--parallel": "1", "--ubatch-size": "256"}, 96.0 + 11.25),
])
def test_kv_cache_matches_llama_server(demo_models: dict[str, Path], model: str, settings: dict[str, str],
                                       mib: float) -> None:
    facts = _facts(demo_models[model])
    assert kv_cache_bytes(settings, facts) / MiB == pytest.approx(mib, abs=0.01)


def test_sliding_window_layers_follow_the_gguf_or_llama_cpp_s_pattern() -> None:
    from modelyard.memory import _sliding_layers

    assert _sliding_layers("gemma3", 18, None) == 15  # every 6th layer is full
    assert _sliding_layers("gemma2", 26, None) == 13
    assert _sliding_layers("any", 4, [True, False, True, True]) == 3  # per-layer flags in the GGUF
    assert _sliding_layers("any", 8, 4) == 6  # a period in the GGUF
    assert _sliding_layers("unknown-arch", 10, None) == 0  # unknown: all full, the estimate errs large


def test_a_model_that_sizes_its_own_context_takes_at_most_the_budget() -> None:
    """Without -c, llama-server's --fit shrinks the context (down to --fit-ctx) until the model fits."""
    full = estimate_footprint({}, [FACTS])  # the trained 8192 tokens
    smallest = estimate_footprint({"--ctx-size": "4096"}, [FACTS])
    between = (full.memory + smallest.memory) // 2
    assert fitted_footprint({}, [FACTS], False, Footprint(between)) == Footprint(between)
    assert fitted_footprint({}, [FACTS], False, Footprint(10 * full.memory)) == full
    assert fitted_footprint({}, [FACTS], False, Footprint()) == full  # no budget
    assert fitted_footprint({}, [FACTS], False, Footprint(MiB)) == smallest  # too big even at its smallest
    for fixed in ({"--ctx-size": "8192"}, {"--fit": "off"}):  # a set context, or fit off: no shrinking
        assert fitted_footprint(fixed, [FACTS], False, Footprint(between)) == estimate_footprint(fixed, [FACTS])
    on_gpu = fitted_footprint({}, [FACTS], True, Footprint(10 * full.memory, between))
    assert on_gpu.gpu == between
