"""Memory: estimates of a model's footprint from its GGUF metadata, what a child really uses, and budgets.

The estimate (weights + KV cache + a compute margin, split between host and GPU memory by the layers
offloaded) is only used until the child has loaded; then the measured figures (its resident memory, and its
GPU memory where nvidia-smi reports it) take over.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelyard.config.options import TRUTHY
from modelyard.file_cache import FileCache, failure, failure_of

# Bytes per element of the KV cache, per llama.cpp cache type (block formats include their scales).
_CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                     "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
_COMPUTE_MARGIN = 64 * 2**20
# Architectures whose layers alternate sliding-window and full attention, as llama.cpp sets them when the GGUF
# has no sliding_window_pattern key: every Nth layer is full, the others keep only the window in their cache.
_SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
_AUTO_PARALLEL = 4  # llama-server's slots with --parallel -1 (auto)
_OFF = ("off", "false", "0", "disabled")
_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mi": 2**20, "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12,
          "tb": 10**12, "ti": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class Footprint:
    """Bytes a model takes in host memory and in GPU memory (all GPUs together)."""

    memory: int = 0
    gpu: int = 0


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
    sliding_window: int = 0  # tokens a sliding-window layer attends to (0 = none)
    sliding_layers: int = 0  # layers with sliding-window attention (their KV cache holds only the window)
    size_label: str = ""  # general.size_label, such as 270M
    quantization: str = ""  # from general.file_type, such as Q4_K_M
    parameters: int = 0  # number of weights
    tools: bool = False  # the chat template renders tools
    thinking: bool = False  # the chat template has a reasoning switch or <think> blocks
    fill_in_middle: bool = False  # the vocabulary has FIM tokens, so /infill (Ollama's `suffix`) works


def parse_size(text: str, total: int) -> int:
    """`16GiB`, `16G`, `1234567` or `75%` (of `total`) to bytes."""
    text = text.strip()
    if text.endswith("%"):
        return int(total * float(text[:-1]) / 100)
    match = _SIZE_RE.match(text)
    if not match or (match.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes, 16GiB, 512MiB or a percentage like 80%)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _meminfo(field: str) -> int:
    """One field of /proc/meminfo, in bytes (0 if it has none such). OSError where there is none (not Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def system_memory() -> int:
    return _meminfo("MemTotal")


def available_memory() -> int:
    """What the kernel can give without swapping (MemAvailable: free memory plus the page cache it can drop),
    in bytes; 0 where unknown."""
    try:
        return _meminfo("MemAvailable")
    except OSError:
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


_GPU_PROCESSES = ("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")


async def gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory per process (all GPUs together) from nvidia-smi, where there is one (empty otherwise).
    Asynchronous: nvidia-smi takes tens of milliseconds, which the event loop must not wait for."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        process = await asyncio.create_subprocess_exec(*_GPU_PROCESSES, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), 5)
    except (OSError, TimeoutError):
        return {}
    used: dict[int, int] = {}
    for pid, _, mib in (line.partition(",") for line in out.decode(errors="replace").splitlines()):
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = used.get(int(pid), 0) + int(mib) * 2**20
    return used


def gpu_total_memory() -> int:
    """Memory of every NVIDIA GPU together, in bytes (0 without nvidia-smi or a GPU); asked once at start."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(int(line.strip()) * 2**20 for line in out.splitlines() if line.strip().isdigit())


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


_Header = tuple[dict[str, Any], list[tuple[int, int]]]


def read_gguf_header(path: Path) -> _Header:
    """The metadata (key -> value; arrays as lists, except the tokenizer's and string arrays, which are skipped
    and read as []) and (elements, bytes) of each tensor, from the header alone.

    Why not gguf's GGUFReader: it builds a numpy view per array item, which took 5.4 CPU-seconds for
    SmolLM2's 49k-token vocabulary and 20 s for Gemma 3's 262k (a load waits for these facts); this reads the
    same fields in well under a second. A file whose tensor data is cut short is refused, as GGUFReader does."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _parse_gguf(data, len(data), GGML_QUANT_SIZES, GGMLQuantizationType)
        except (struct.error, IndexError, OverflowError) as exc:
            raise ValueError(f"truncated or corrupt GGUF header: {exc}") from None


def _parse_gguf(data: Any, size: int, quant_sizes: Any, quant_type: Any) -> _Header:
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"not a GGUF file (it starts with {bytes(data[:4])!r})")
    order = "<" if struct.unpack_from("<I", data, 4)[0] < 0x10000 else ">"  # big-endian files exist
    tensor_count, kv_count = struct.unpack_from(f"{order}QQ", data, 8)
    offset = 24

    def number(fmt: str) -> Any:
        nonlocal offset
        value = struct.unpack_from(order + fmt, data, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = number("Q")
        if offset + length > size:
            raise ValueError(f"truncated GGUF header: a string of {length} bytes at byte {offset}")
        text = bytes(data[offset:offset + length]).decode("utf-8", errors="replace")
        offset += length
        return text

    fields: dict[str, Any] = {}
    for _ in range(kv_count):
        key = string()
        kind = number("I")
        if kind == _GGUF_STRING:
            fields[key] = string()
        elif kind in _GGUF_SCALARS:
            fields[key] = number(_GGUF_SCALARS[kind])
        elif kind == _GGUF_ARRAY:
            item, count = number("I"), number("Q")
            if item == _GGUF_STRING:
                for _ in range(count):
                    offset += 8 + struct.unpack_from(order + "Q", data, offset)[0]
                fields[key] = []
            elif item in _GGUF_SCALARS:
                width = struct.calcsize(_GGUF_SCALARS[item])
                skip = key.startswith("tokenizer.")
                fields[key] = [] if skip else list(struct.unpack_from(f"{order}{count}{_GGUF_SCALARS[item]}", data,
                                                                      offset))
                offset += width * count
            else:
                raise ValueError(f"unsupported GGUF array of type {item} in {key}")
        else:
            raise ValueError(f"unsupported GGUF value type {kind} in {key}")
    tensors: list[tuple[str, int, int, int]] = []
    for _ in range(tensor_count):
        name = string()
        dims = [number("Q") for _ in range(number("I"))]
        kind, start = number("I"), number("Q")
        block, type_size = quant_sizes[quant_type(kind)]
        elements = math.prod(dims)
        tensors.append((name, start, elements, elements * type_size // block))
    alignment = int(fields.get("general.alignment", 32) or 32)
    data_start = -(-offset // alignment) * alignment
    for name, start, _, length in tensors:
        if data_start + start + length > size:
            raise ValueError(f"truncated GGUF: tensor {name} ends at byte {data_start + start + length} but the "
                             f"file has {size}")
    return fields, [(elements, length) for _, _, elements, length in tensors]


def read_gguf(path: Path) -> GgufFacts:
    """Read tensor sizes and attention shape from the GGUF header (see read_gguf_header; still enough work on
    a big file that callers run it off the event loop, in modelyard.background, and cache it)."""
    fields, tensors = read_gguf_header(path)

    def value(key: str, default: Any = 0) -> Any:
        if key not in fields:
            return default
        contents = fields[key]
        return max(contents) if isinstance(contents, list) and contents else contents

    from gguf import LlamaFileType

    arch = str(value("general.architecture", ""))
    try:
        quantization = LlamaFileType(int(value("general.file_type", -1))).name.removeprefix("MOSTLY_")
    except ValueError:
        quantization = ""
    template = str(value("tokenizer.chat_template", ""))
    heads = int(value(f"{arch}.attention.head_count", 0) or 0)
    embedding = int(value(f"{arch}.embedding_length", 0) or 0)
    head_size = embedding // heads if heads else 0
    blocks = int(value(f"{arch}.block_count", 0) or 0)
    window = int(value(f"{arch}.attention.sliding_window", 0) or 0)
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    return GgufFacts(
        tensor_bytes=sum(length for _, length in tensors),
        architecture=arch,
        context_length=int(value(f"{arch}.context_length", 0) or 0),
        block_count=blocks,
        sliding_window=window,
        sliding_layers=_sliding_layers(arch, blocks, pattern) if window else 0,
        head_count_kv=int(value(f"{arch}.attention.head_count_kv", heads) or heads),
        key_length=int(value(f"{arch}.attention.key_length", head_size) or head_size),
        value_length=int(value(f"{arch}.attention.value_length", head_size) or head_size),
        size_label=str(value("general.size_label", "")),
        quantization=quantization,
        parameters=sum(elements for elements, _ in tensors),
        tools="tools" in template,
        thinking="enable_thinking" in template or "<think>" in template,
        fill_in_middle=any(f"tokenizer.ggml.{key}_token_id" in fields for key in ("fim_pre", "prefix")),
    )


class GgufCache:
    """GGUF facts cached on disk per file: read once per file per machine (a failure too: a truncated file is
    not re-parsed until it changes). modelyard.background fills it from its idle-priority worker."""

    def __init__(self, directory: Path) -> None:
        self.cache = FileCache(directory / "gguf-facts.json", version="5")

    def get(self, path: Path) -> GgufFacts | None:
        """The facts if known (never reads the file's metadata)."""
        return facts_from(self.cache.get(path))

    def read(self, path: Path) -> GgufFacts:
        """The facts, read now if not cached (blocking: only for start-up checks, before any child runs).
        Raises ValueError for a file known not to parse."""
        key = self.cache.key(path)
        if key is None:
            raise FileNotFoundError(f"no such file: {path}")
        cached = self.cache.lookup(key)
        message = failure_of(cached)
        if message is not None:
            raise ValueError(message)
        facts = facts_from(cached)
        if facts is not None:
            return facts
        try:
            facts = read_gguf(path)
        except Exception as exc:
            self.cache.put(key, failure(describe_failure(exc)))
            raise
        self.cache.put(key, asdict(facts))
        return facts


def facts_from(entry: Any) -> GgufFacts | None:
    """GgufFacts from a cache entry (None for a failure, a missing entry or one of another shape)."""
    if not isinstance(entry, dict) or failure_of(entry) is not None:
        return None
    try:
        return GgufFacts(**entry)
    except TypeError:
        return None


def describe_failure(exc: BaseException) -> str:
    """One line for a file that could not be read: `ValueError: ...` (the gguf reader's messages are terse)."""
    return f"{type(exc).__name__}: {exc}"


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


def _sliding_layers(arch: str, blocks: int, pattern: Any) -> int:
    """How many layers use the sliding window: from the GGUF's per-layer flags or period, else from what
    llama.cpp hard-codes for the architecture; unknown = none (the estimate then errs on the large side)."""
    if isinstance(pattern, list):
        return sum(1 for flag in pattern[:blocks] if flag)
    period = int(pattern) if isinstance(pattern, int) else _SWA_PATTERNS.get(arch, 0)
    return sum(1 for layer in range(blocks) if layer % period < period - 1) if period > 1 else 0


def kv_cache_bytes(settings: Mapping[str, str], facts: GgufFacts) -> int:
    """KV cache as llama-server allocates it (checked against its own log): every layer x KV heads x (key +
    value head size) x bytes for the cache type, for the whole context; a sliding-window layer (unless
    --swa-full) only for the window of each slot plus one micro-batch."""
    key_bytes = _CACHE_TYPE_BYTES.get(settings.get("--cache-type-k", "f16").lower(), 2.0)
    value_bytes = _CACHE_TYPE_BYTES.get(settings.get("--cache-type-v", "f16").lower(), 2.0)
    per_cell = facts.head_count_kv * (facts.key_length * key_bytes + facts.value_length * value_bytes)
    ctx = serving_context(settings, facts)
    sliding = 0 if settings.get("--swa-full", "false").lower() in TRUTHY else facts.sliding_layers
    return int(per_cell * ((facts.block_count - sliding) * ctx + sliding * _window_cells(settings, facts, ctx)))


def _window_cells(settings: Mapping[str, str], facts: GgufFacts, ctx: int) -> int:
    """Cells of one sliding-window layer: auto slots share one unified cache (window x slots + micro-batch);
    explicit --parallel N gives each slot its own (window + micro-batch); padded to 256 cells."""
    explicit = _int(settings.get("--parallel"), -1)
    slots = explicit if explicit > 0 else _AUTO_PARALLEL
    unified = settings.get("--kv-unified", "false" if explicit > 0 else "true").lower() in TRUTHY
    ubatch = _int(settings.get("--ubatch-size"), 512)
    if unified:
        return min(ctx, _pad(facts.sliding_window * slots + ubatch))
    return slots * min(ctx // slots, _pad(facts.sliding_window + ubatch))


def _pad(cells: int, to: int = 256) -> int:
    return -(-cells // to) * to


def estimate_footprint(settings: Mapping[str, str], facts: list[GgufFacts], gpu: bool = False) -> Footprint:
    """Weights (every tensor, mmproj and draft model included) + KV cache for the configured context and cache
    type + a compute-buffer margin. llama-server's -c is the total context over all slots; 0 means the model's
    trained context for each of the parallel slots. With `gpu`, the share of the layers llama-server offloads
    (--n-gpu-layers, default all) and their KV cache (unless --no-kv-offload) count as GPU memory."""
    if not facts:
        return Footprint()
    main = facts[0]
    weights = sum(f.tensor_bytes for f in facts)
    kv = kv_cache_bytes(settings, main)
    margin = _COMPUTE_MARGIN + weights // 20
    share = offloaded_share(settings, main) if gpu else 0.0
    if share == 0.0:
        return Footprint(weights + kv + margin)
    kv_on_gpu = kv if settings.get("--kv-offload", "true").lower() in TRUTHY else 0
    offloaded = int((weights + kv_on_gpu) * share)
    return Footprint(weights + kv - offloaded + _COMPUTE_MARGIN, offloaded + margin)


def fitted_settings(settings: Mapping[str, str], facts: list[GgufFacts], gpu: bool,
                    budget: Footprint) -> Mapping[str, str]:
    """Where llama-server would size the context itself (no -c, --fit on: its defaults) and the trained
    context does not fit the budget, the settings with the largest -c that does, as --fit would choose it
    from the memory it finds free, but from the budget (not below --fit-ctx). Otherwise `settings` as is."""
    if not facts or _int(settings.get("--ctx-size"), 0) or settings.get("--fit", "on").lower() in _OFF:
        return settings
    if _within(estimate_footprint(settings, facts, gpu), budget):
        return settings
    slots = _int(settings.get("--parallel"), -1)
    low = _int(settings.get("--fit-ctx"), 4096) * (slots if slots > 0 else 1) // 256
    high = serving_context(settings, facts[0]) // 256
    if low >= high:
        return settings  # the trained context is already the smallest --fit would choose
    while low < high:  # the largest multiple of 256 cells that fits
        middle = (low + high + 1) // 2
        if _within(estimate_footprint({**settings, "--ctx-size": str(middle * 256)}, facts, gpu), budget):
            low = middle
        else:
            high = middle - 1
    return {**settings, "--ctx-size": str(low * 256)}


def _within(footprint: Footprint, budget: Footprint) -> bool:
    return (not budget.memory or footprint.memory <= budget.memory) and (not budget.gpu or footprint.gpu <= budget.gpu)


def fitted_footprint(settings: Mapping[str, str], facts: list[GgufFacts], gpu: bool, budget: Footprint) -> Footprint:
    return estimate_footprint(fitted_settings(settings, facts, gpu, budget), facts, gpu)


def offloaded_share(settings: Mapping[str, str], facts: GgufFacts) -> float:
    """The share of the model's layers (the repeating ones and the output layer) that go to GPUs."""
    if settings.get("--device", "").strip().lower() == "none":
        return 0.0
    layers = facts.block_count + 1
    wanted = settings.get("--n-gpu-layers", "auto").strip().lower()
    if wanted in ("auto", "all", "-1"):
        return 1.0
    return min(max(_int(wanted, layers), 0), layers) / layers


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


def describe(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
