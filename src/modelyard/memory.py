"""Memory: estimates of a model's footprint from its GGUF metadata, what a child really uses, and budgets.

The estimate (weights + KV cache + a compute margin) is only used until the child has loaded; then the
measured figure (its resident memory, and GPU memory where nvidia-smi reports it) takes over.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelyard.file_cache import FileCache

# Bytes per element of the KV cache, per llama.cpp cache type (block formats include their scales).
_CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                     "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
_COMPUTE_MARGIN = 64 * 2**20
_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12,
          "tb": 10**12, "ti": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class GgufFacts:
    """What the footprint estimate needs from one GGUF file."""

    tensor_bytes: int
    architecture: str = ""
    context_length: int = 0
    block_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    size_label: str = ""  # general.size_label, such as 270M
    quantization: str = ""  # from general.file_type, such as Q4_K_M
    parameters: int = 0  # number of weights


def parse_size(text: str, total: int) -> int:
    """`16GiB`, `16G`, `1234567` or `75%` (of `total`) to bytes."""
    text = text.strip()
    if text.endswith("%"):
        return int(total * float(text[:-1]) / 100)
    match = _SIZE_RE.match(text)
    if not match or (match.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes, 16GiB, 512MiB or a percentage like 80%)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def system_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def process_memory(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory per process from nvidia-smi, where there is one (empty otherwise)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used: dict[int, int] = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = used.get(int(pid), 0) + int(mib) * 2**20
    return used


def read_gguf(path: Path) -> GgufFacts:
    """Read tensor sizes and attention shape with llama.cpp's own `gguf` reader (slow: seconds for big
    vocabularies, so callers run it off the event loop and cache it)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str, default: Any = 0) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return default
        contents = field.contents()
        return max(contents) if isinstance(contents, list) and contents else contents

    from gguf import LlamaFileType

    arch = str(value("general.architecture", ""))
    try:
        quantization = LlamaFileType(int(value("general.file_type", -1))).name.removeprefix("MOSTLY_")
    except ValueError:
        quantization = ""
    heads = int(value(f"{arch}.attention.head_count", 0) or 0)
    embedding = int(value(f"{arch}.embedding_length", 0) or 0)
    head_size = embedding // heads if heads else 0
    return GgufFacts(
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        architecture=arch,
        context_length=int(value(f"{arch}.context_length", 0) or 0),
        block_count=int(value(f"{arch}.block_count", 0) or 0),
        head_count_kv=int(value(f"{arch}.attention.head_count_kv", heads) or heads),
        key_length=int(value(f"{arch}.attention.key_length", head_size) or head_size),
        value_length=int(value(f"{arch}.attention.value_length", head_size) or head_size),
        size_label=str(value("general.size_label", "")),
        quantization=quantization,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
    )


class GgufCache:
    """GGUF facts cached on disk per file: read once per file per machine."""

    def __init__(self, directory: Path) -> None:
        self._cache = FileCache(directory / "gguf-facts.json", version="2")

    def get(self, path: Path) -> GgufFacts | None:
        entry = self._cache.get(path)
        return GgufFacts(**entry) if entry else None

    def read(self, path: Path) -> GgufFacts:
        cached = self.get(path)
        if cached is not None:
            return cached
        facts = read_gguf(path)
        self._cache.put(path, asdict(facts))
        return facts


def model_files(settings: Mapping[str, str]) -> list[Path]:
    """The model's files: every shard of a split model, plus mmproj and draft model."""
    files: list[Path] = []
    main = settings.get("--model")
    if main:
        path = Path(main)
        shard = re.search(r"-00001-of-(\d{5})\.gguf$", path.name)
        if shard:
            files += [path.with_name(path.name.replace("-00001-of-", f"-{i:05d}-of-"))
                      for i in range(1, int(shard.group(1)) + 1)]
        else:
            files.append(path)
    files += [Path(settings[key]) for key in ("--mmproj", "--spec-draft-model") if settings.get(key)]
    return [f for f in files if f.is_file()]


def estimate_footprint(settings: Mapping[str, str], facts: list[GgufFacts]) -> int:
    """Weights (every tensor, mmproj included) + KV cache for the configured context and cache type +
    a compute-buffer margin. llama-server's -c is the total context over all slots; 0 means the model's
    trained context for each of the parallel slots."""
    if not facts:
        return 0
    main = facts[0]
    weights = sum(f.tensor_bytes for f in facts)
    ctx = serving_context(settings, main)
    per_cell = main.block_count * main.head_count_kv
    key_bytes = _CACHE_TYPE_BYTES.get(settings.get("--cache-type-k", "f16").lower(), 2.0)
    value_bytes = _CACHE_TYPE_BYTES.get(settings.get("--cache-type-v", "f16").lower(), 2.0)
    kv = int(per_cell * ctx * (main.key_length * key_bytes + main.value_length * value_bytes))
    return weights + kv + _COMPUTE_MARGIN + weights // 20


def serving_context(settings: Mapping[str, str], facts: GgufFacts) -> int:
    """The context llama-server allocates (measured against its own n_ctx): -c if set, which is the total over
    all slots; with -c 0, the trained context, times --parallel if that is set explicitly."""
    parallel = _int(settings.get("--parallel"), 1) if _int(settings.get("--parallel"), -1) > 0 else 1
    return _int(settings.get("--ctx-size"), 0) or facts.context_length * parallel


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def default_budget() -> int:
    """80% of the machine's memory: room for the OS and modelyard itself."""
    return int(system_memory() * 0.8)


def describe(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
