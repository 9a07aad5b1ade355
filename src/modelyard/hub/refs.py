"""Hugging Face model references and file choice, the rules of llama.cpp's common/download.cpp (pure).

`org/repo[:quant]` names a repository and optionally a quant; the quant is matched case-insensitively against
the file names (`Q4_K_M` picks `model-Q4_K_M.gguf`, or `-00001-of-000NN` of a split model); without one,
Q4_K_M, then Q8_0, then the first model file. `hf-file` names the file exactly and overrides the quant. A
projector (`mmproj`) is chosen next to the model: the deepest shared folder first, then the quant closest in
bits. The same tag rule names cached models (`org/repo:Q4_K_M`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_SPLIT_RE = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
PRESET_FILE = "preset.ini"  # at a repository's root: a preset repository (hub/presets.py)
# Files next to a model that are not models themselves (llama.cpp's gguf_filename_is_model).
_COMPANION_MARKS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


class RefError(ValueError):
    """A reference that is not `org/repo[:quant]`; the message says what to write instead."""


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: the repository, and the quant tag or exact file that picks its GGUF."""

    repo: str
    tag: str = ""
    file: str = ""

    @property
    def name(self) -> str:
        """The model's name as router mode lists it (`org/repo:Q4_K_M`, or `org/repo` without a tag)."""
        return f"{self.repo}:{self.tag}" if self.tag else self.repo


def parse_ref(text: str, file: str = "") -> HubRef:
    """`org/repo[:quant]` (llama.cpp's common_download_split_repo_tag, with its repo-id check)."""
    text = text.strip()
    repo, _, tag = text.partition(":")
    if ":" in tag:  # router mode takes the last part as the tag; a second colon is a typo, not a quant
        raise RefError(f"'{text}' has more than one ':'; write org/repo or org/repo:QUANT")
    if not is_valid_repo_id(repo):
        raise RefError(f"'{text}' is not a Hugging Face model: write org/repo or org/repo:QUANT "
                       f"(e.g. ggml-org/SmolLM2-135M-Instruct-GGUF:Q4_K_M)")
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise RefError(f"'{tag}' is not a quant tag: use letters, digits and _ (e.g. Q4_K_M, Q8_0, F16)")
    return HubRef(repo, tag.upper(), file.strip())


def is_valid_repo_id(repo: str) -> bool:
    """llama.cpp's rule: one `/`, characters [A-Za-z0-9_], and `/.-` only between two of them."""
    if not repo or len(repo) > 256 or repo.count("/") != 1:
        return False
    return re.fullmatch(r"[A-Za-z0-9_]+(?:[/.-][A-Za-z0-9_]+)*", repo) is not None


def is_valid_oid(oid: str) -> bool:
    """A git (40 hex) or LFS sha256 (64 hex) object id, as the hub reports them."""
    return re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", oid) is not None


@dataclass(frozen=True)
class SplitInfo:
    prefix: str  # the path without `.gguf` and without the split suffix (tag included)
    tag: str  # upper case; "" when the name ends in no tag
    index: int
    count: int


def split_info(path: str) -> SplitInfo | None:
    """`dir/model-Q4_K_M-00001-of-00003.gguf` -> (dir/model-Q4_K_M, Q4_K_M, 1, 3); None for a non-GGUF file."""
    if not path.endswith(".gguf"):
        return None
    prefix, index, count = path.removesuffix(".gguf"), 1, 1
    split = _SPLIT_RE.match(prefix)
    if split:
        prefix, index, count = split.group(1), int(split.group(2)), int(split.group(3))
    tag = _TAG_RE.search(prefix)
    return SplitInfo(prefix, tag.group(1).upper() if tag else "", index, count)


def quant_bits(tag: str) -> int:
    """Q4_0 -> 4, F16 -> 16, NVFP4 -> 4, Q8_K_M -> 8; 0 when the tag has no digits."""
    digits = re.search(r"[0-9]+", tag)
    return int(digits.group(0)) if digits else 0


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(mark in name for mark in _COMPANION_MARKS)


def _first_shard(path: str) -> bool:
    info = split_info(path)
    return info is not None and (info.count <= 1 or info.index == 1)


def best_model(files: Sequence[str], tag: str = "") -> str | None:
    """The file a reference loads (llama.cpp's find_best_model); None when the quant matches no file."""
    for wanted in ([tag] if tag else _DEFAULT_TAGS):
        pattern = re.compile(re.escape(wanted) + r"[.-]", re.IGNORECASE)
        for path in files:
            if is_model_file(path) and pattern.search(path) and _first_shard(path):
                return path
    if not tag:
        return next((p for p in files if is_model_file(p) and _first_shard(p)), None)
    return None


def split_files(files: Sequence[str], primary: str) -> list[str]:
    """Every shard of a split model (the primary alone when it is not split), in the listing's order."""
    info = split_info(primary)
    if info is None or info.count <= 1:
        return [primary]
    shards = []
    for path in files:
        other = split_info(path)
        if other is not None and other.count == info.count and other.prefix == info.prefix:
            shards.append(path)
    return shards


def best_sibling(files: Sequence[str], model: str, keyword: str, tag: str = "") -> str | None:
    """The companion file (`mmproj`, `mtp-`, ...) for `model`: under the model's own folder, the deepest shared
    folder first, then an exact tag match, then the quant closest in bits (llama.cpp's find_best_sibling)."""
    model_bits = quant_bits(tag.upper()) if tag else quant_bits((split_info(model) or SplitInfo("", "", 1, 1)).tag)
    model_dirs = model.split("/")[:-1]
    best: tuple[int, bool, int] | None = None  # (depth, exact, -diff): larger is better
    chosen = None
    for path in files:
        if not path.endswith(".gguf") or keyword not in path:
            continue
        dirs = path.split("/")[:-1]
        if dirs != model_dirs[:len(dirs)]:
            continue  # not in the model's folder or one of its parents
        info = split_info(path)
        diff = abs(quant_bits(info.tag if info else "") - model_bits)
        exact = bool(tag) and f"-{tag.upper()}." in path.upper()
        rank = (len(dirs), exact, -diff)
        if best is None or rank > best:
            best, chosen = rank, path
    return chosen


@dataclass(frozen=True)
class Plan:
    """What a reference downloads and loads: the model's files (its shards), the first of them, and the
    projector if one is wanted and found."""

    primary: str
    model_files: tuple[str, ...]
    mmproj: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return self.model_files + ((self.mmproj,) if self.mmproj else ())


class NotInRepo(LookupError):
    """The reference names a quant or file the repository does not have; the message lists what it has."""


def plan(files: Sequence[str], ref: HubRef, want_mmproj: bool = True) -> Plan:
    """The files `ref` needs out of a repository's (or the cache's) file list."""
    if ref.file and ref.file not in files:
        raise NotInRepo(f"file '{ref.file}' is not in {ref.repo}{_available(files, ref.repo)}")
    primary = ref.file or best_model(files, ref.tag)
    if primary is None:
        what = f"no GGUF file with quant {ref.tag}" if ref.tag else "no GGUF model file"
        raise NotInRepo(f"{ref.repo} has {what}{_available(files, ref.repo)}")
    mmproj = best_sibling(files, primary, "mmproj") if want_mmproj else None
    return Plan(primary, tuple(split_files(files, primary)), mmproj)


def is_preset_repo(paths: Sequence[str]) -> bool:
    """Whether a repository's files make it a preset repository (llama.cpp's plan.preset): `preset.ini` at
    its root, not in a folder."""
    return PRESET_FILE in paths


def _available(files: Sequence[str], repo: str) -> str:
    ggufs = [p for p in files if p.endswith(".gguf")]
    tags = sorted({info.tag for p in ggufs if is_model_file(p) and (info := split_info(p)) and info.tag})
    if not ggufs and is_preset_repo(files):
        return (f" (it has no .gguf files: it is a preset repository, whose {PRESET_FILE} names other models; "
                f"serve its presets with `modelyard serve -hf {repo}`)")
    if not ggufs:
        return " (it has no .gguf files at all)"
    shown = ", ".join(tags) if tags else ", ".join(ggufs[:8])
    return f"; it has: {shown}"
