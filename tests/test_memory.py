"""Footprint estimates (host and GPU), sizes, and reading nvidia-smi (a stand-in script on PATH: this
machine has no GPU)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from modelyard.memory import (
    Footprint,
    GgufFacts,
    estimate_footprint,
    gpu_memory_by_pid,
    gpu_total_memory,
    offloaded_share,
    parse_size,
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
