"""Router-mode INI presets: parsed with the same grammar and key rules as llama-server's `common/preset.cpp`.

Every problem is reported with the file, line and section, and stops the server from starting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config.options import FALSEY, TRUTHY, OptionTable, refusal, value_error

GLOBAL_SECTION = "*"
DEFAULT_SECTION = "default"  # keys before any [section] land here, as in router mode

_IDENT = r"[A-Za-z_][A-Za-z0-9_.-]*"
_HEADER_RE = re.compile(r"^[ \t]*\[[ \t]*([^\]]*?)[ \t]*\][ \t]*(?:[;#].*)?$")
_KV_RE = re.compile(rf"^[ \t]*({_IDENT})[ \t]*=[ \t]*([^;#]*?)[ \t]*(?:[;#].*)?$")
_SKIP_RE = re.compile(r"^[ \t]*(?:[;#].*)?$")
_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the file, line and section."""


@dataclass(frozen=True)
class Setting:
    """One option value and where it was written (for error messages)."""

    value: str
    origin: str


@dataclass
class Section:
    name: str
    origin: str
    settings: dict[str, Setting] = field(default_factory=dict)  # canonical flag -> setting


@dataclass
class PresetFile:
    path: Path
    global_settings: dict[str, Setting]
    sections: dict[str, Section]
    text: str


def canonical_section_name(name: str) -> str:
    """`repo:q4_k_m` becomes `repo:Q4_K_M`, as router mode names tagged sections."""
    head, colon, tag = name.rpartition(":")
    if not colon or name in (GLOBAL_SECTION, DEFAULT_SECTION):
        return name
    match = _TAG_RE.search(tag)
    return f"{head}:{(match.group(1) if match else tag).upper()}"


def normalise_value(table: OptionTable, key: str, value: str) -> str:
    """Apply router mode's boolean rule: a negated key (`no-mmap = true`) flips the value."""
    if table.is_negation(key):
        return "false" if value.lower() in TRUTHY else "true"
    return value


def read_preset_file(path: Path, table: OptionTable) -> PresetFile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"preset file does not exist: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"failed to read preset file {path}: {exc}") from None

    sections: dict[str, Section] = {}
    current = Section(DEFAULT_SECTION, f"{path}:1")
    sections[DEFAULT_SECTION] = current
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if _SKIP_RE.match(line):
            continue
        header = _HEADER_RE.match(line)
        if header:
            name = canonical_section_name(header.group(1))
            if not name:
                raise ConfigError(f"{where}: empty section name")
            if name in sections and name != DEFAULT_SECTION:
                raise ConfigError(f"{where}: section [{name}] is defined twice "
                                  f"(first at {sections[name].origin})")
            current = sections.setdefault(name, Section(name, where))
            continue
        kv = _KV_RE.match(line)
        if not kv:
            raise ConfigError(f"{where}: cannot parse {line.strip()!r}: expected `[section]`, "
                              f"`key = value`, a `;`/`#` comment or a blank line")
        _add_setting(table, current, kv.group(1), kv.group(2), where)

    default = sections[DEFAULT_SECTION]
    if not default.settings:
        del sections[DEFAULT_SECTION]
    global_section = sections.pop(GLOBAL_SECTION, None)
    return PresetFile(path, global_section.settings if global_section else {}, sections, text)


def _add_setting(table: OptionTable, section: Section, key: str, value: str, where: str) -> None:
    if key == "version":
        return
    option = table.lookup(key)
    if option is None:
        raise ConfigError(f"{where}: option '{key}' not recognized in preset [{section.name}]; use a "
                          f"llama-server flag without dashes (ctx-size), a short flag (c) or its env name "
                          f"(LLAMA_ARG_CTX_SIZE)")
    if option.is_bool and value.lower() not in TRUTHY | FALSEY:
        raise ConfigError(f"{where}: option '{key}' in preset [{section.name}] is a boolean; "
                          f"got {value!r}, expected one of on/off, true/false, enabled/disabled, 1/0")
    normalised = normalise_value(table, key, value)
    problem = value_error(option.canonical, value) or refusal(option, key, normalised)
    if problem:
        raise ConfigError(f"{where}: in preset [{section.name}]: {problem}")
    section.settings[option.canonical] = Setting(normalised, where)
