"""The engine's option table, read from `llama-server --help`, so preset keys are checked like router mode does."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from modelyard.file_cache import FileCache

TRUTHY = frozenset({"on", "enabled", "true", "1"})
FALSEY = frozenset({"off", "disabled", "false", "0"})

_ENV_RE = re.compile(r"\(env: ([A-Z0-9_]+)\)")
_FLAG_RE = re.compile(r"^-{1,2}[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class EngineOption:
    """One engine option: its spellings, whether it takes a value, and its negated forms."""

    flags: tuple[str, ...]
    negations: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    takes_value: bool = False
    preset_only: bool = False

    @property
    def canonical(self) -> str:
        """The long form that router mode renders (its last spelling)."""
        return self.flags[-1]

    @property
    def is_bool(self) -> bool:
        return bool(self.negations)

    def spellings(self) -> Iterable[str]:
        for flag in (*self.flags, *self.negations):
            yield flag.lstrip("-")
        yield from self.env


# Keys that only mean something in a preset; router mode has the first three, modelyard adds the rest.
PRESET_ONLY_OPTIONS: tuple[EngineOption, ...] = (
    EngineOption(("load-on-startup",), env=("LLAMA_ARG_PRESET_LOAD_ON_STARTUP",), takes_value=True,
                 preset_only=True),
    EngineOption(("stop-timeout",), env=("LLAMA_ARG_PRESET_STOP_TIMEOUT",), takes_value=True, preset_only=True),
    EngineOption(("dedup-cache-models",), env=("LLAMA_ARG_PRESET_DEDUP_CACHE_MODELS",), takes_value=True,
                 preset_only=True),
    EngineOption(("cmd",), takes_value=True, preset_only=True),
    EngineOption(("keep-alive",), takes_value=True, preset_only=True),
    EngineOption(("pin",), takes_value=True, preset_only=True),
    EngineOption(("priority",), takes_value=True, preset_only=True),
    EngineOption(("concurrency-limit",), takes_value=True, preset_only=True),
    EngineOption(("load-timeout",), takes_value=True, preset_only=True),
    EngineOption(("replicas",), takes_value=True, preset_only=True),
)


def value_error(canonical: str, value: str) -> str | None:
    """What is wrong with a value that llama-server refuses when it parses its flags (None: nothing known).
    Router mode refuses these on its own command line, at start; modelyard checks them wherever they are
    written, so that a bad value stops it at start instead of failing every child's load."""
    if canonical == "--sleep-idle-seconds":
        try:
            seconds = int(value)
        except ValueError:
            seconds = 0
        if seconds == 0 or seconds < -1:
            return (f"--sleep-idle-seconds takes a whole number of seconds of idleness after which a model's "
                    f"server frees the model until its next request, or -1 for never; got {value!r}")
    return None


# llama-server's agent features, which modelyard does not offer, by canonical flag: what each would let any
# caller do on this host. /tools and /cors-proxy answer 403 "this feature is disabled" (api/disabled.py), as
# router mode's do without these flags, and a child is never started with them (its MCP servers would run in
# every child, unreachable).
_AGENT_FEATURES = {
    "--tools": "llama-server's built-in tools would run shell commands and edit files on this host for any "
               "caller of /tools",
    "--tools-runtime": "it runs llama-server's built-in tools, which would run shell commands and edit files for "
                       "any caller of /tools",
    "--agent": "it turns on llama-server's built-in tools, which would run shell commands and edit files on this "
               "host for any caller, and /cors-proxy, which would fetch any URL for them",
    "--webui-mcp-proxy": "/cors-proxy would fetch any URL, this host's own network included, for any caller",
    "--mcp-servers-config": "it starts MCP servers whose tools any caller of /tools could run on this host",
    "--mcp-servers-json": "it starts MCP servers whose tools any caller of /tools could run on this host",
}


def refusal(option: EngineOption, written: str, value: str) -> str | None:
    """Why modelyard refuses this setting (`written`: the flag, preset key or variable as the user wrote it),
    or None. Turning a feature off (`--no-agent`, an empty list) is accepted."""
    why = _AGENT_FEATURES.get(option.canonical)
    if why is None or (value.lower() not in TRUTHY if option.is_bool else not value.strip()):
        return None
    return (f"{written} is not offered by modelyard: {why}; /tools and /cors-proxy stay 403 \"this feature is "
            f"disabled\". Remove it")


def environment_refusal(environ: Mapping[str, str], table: OptionTable) -> str | None:
    """The refusal of an agent feature set in the environment (LLAMA_ARG_TOOLS, LLAMA_ARG_AGENT, ...), which
    llama-server reads as its flags, or None."""
    for name, value in sorted(environ.items()):
        option = table.lookup(name) if name.startswith("LLAMA_ARG_") else None
        problem = refusal(option, name, value) if option is not None and name in option.env else None
        if problem:
            return problem
    return None


def explicit_setting(settings: Mapping[str, str], flag: str, environ: Mapping[str, str],
                     env: Iterable[str]) -> tuple[str, str] | None:
    """What a child is told for `flag` (canonical) and where it says so: its setting (`threads = 4`), else the
    first of the option's environment variables `env` set in `environ` (`LLAMA_ARG_THREADS=4`): children
    inherit modelyard's environment and llama-server reads them where no flag is given, so one is as explicit
    a choice as the flag. None where neither sets it."""
    if flag in settings:
        return settings[flag], f"{flag.lstrip('-')} = {settings[flag]}"
    for name in env:
        if name in environ:
            return environ[name], f"{name}={environ[name]}"
    return None


class OptionTable:
    """Maps every spelling of an option (long, short, env name) to the option."""

    def __init__(self, options: Iterable[EngineOption]) -> None:
        self.options = tuple(options) + PRESET_ONLY_OPTIONS
        self._by_key: dict[str, EngineOption] = {}
        for option in self.options:
            for key in option.spellings():
                self._by_key.setdefault(key, option)

    def lookup(self, key: str) -> EngineOption | None:
        """Find an option by preset key (`ctx-size`, `c`, `LLAMA_ARG_CTX_SIZE`) or flag (`--ctx-size`)."""
        return self._by_key.get(key.lstrip("-") if key.startswith("-") else key)

    def env_of(self, flag: str) -> tuple[str, ...]:
        """The environment variables llama-server reads for `flag` (none for an unknown option)."""
        option = self.lookup(flag)
        return option.env if option is not None else ()

    def is_negation(self, key: str) -> bool:
        option = self.lookup(key)
        bare = key.lstrip("-")
        return option is not None and any(neg.lstrip("-") == bare for neg in option.negations)


def parse_help(text: str) -> list[EngineOption]:
    """Parse llama.cpp's `--help` layout: option headers at column 0, help text from column 40."""
    options: list[EngineOption] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("-"):
            blocks.append([line])
        elif blocks and line.startswith(" "):
            blocks[-1].append(line)
    for block in blocks:
        option = _parse_block(block)
        if option is not None:
            options.append(option)
    return options


def _parse_block(block: list[str]) -> EngineOption | None:
    first = block[0]
    header = first[:40] if len(first) > 40 and first[38:40] == "  " else first
    flags: list[str] = []
    hints: list[str] = []
    for token in header.split():
        bare = token.rstrip(",")
        if not hints and _FLAG_RE.match(bare):
            flags.append(bare)
        else:
            hints.append(token)
    if not flags:
        return None
    # llama.cpp prints the positive spellings first, then the negated ones (`-kvu, --kv-unified, -no-kvu, ...`);
    # a short negation need not start with no- (`-kvo, --kv-offload, -nkvo, --no-kv-offload`, `--repack, -nr`).
    split = next((i for i, f in enumerate(flags) if i > 0 and f.lstrip("-").startswith("no-")), len(flags))
    if split < len(flags):
        while split > 1 and not flags[split - 1].startswith("--") and flags[split - 2].startswith("--"):
            split -= 1
    positives, negations = tuple(flags[:split]), tuple(flags[split:])
    env = tuple(_ENV_RE.findall(" ".join(block)))
    return EngineOption(flags=positives, negations=negations, env=env, takes_value=bool(hints))


_PARSER_VERSION = 2  # bump when parse_help changes, so cached tables are parsed again


def load_option_table(binary: Path, cache_dir: Path) -> OptionTable:
    """Run `binary --help` once per binary version and cache the parsed table next to the engine cache: one
    file of tables keyed by the binary's path, size and mtime (FileCache: written atomically; the entries of
    binaries since changed or gone are dropped, where a file per binary version grew with every build and
    every test's stand-in binary)."""
    cache = FileCache(cache_dir / "engine-options.json", version=str(_PARSER_VERSION))
    key = cache.key(binary)
    raw = None if key is None else cache.lookup(key)
    if raw is not None:
        try:
            return OptionTable(_option_from_json(item) for item in raw)
        except (ValueError, TypeError, KeyError):  # written by another parser: read the help again
            pass
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, check=False)
    options = parse_help(result.stdout)
    if not options:
        raise RuntimeError(f"could not read the options of {binary}: `--help` printed no options "
                           f"(exit code {result.returncode}): {result.stderr[-500:]}")
    if key is not None:
        cache.put(key, [asdict(o) for o in options])
    return OptionTable(options)


def _option_from_json(item: Mapping[str, object]) -> EngineOption:
    def strings(key: str) -> tuple[str, ...]:
        value = item[key]
        assert isinstance(value, list)
        return tuple(str(v) for v in value)

    return EngineOption(flags=strings("flags"), negations=strings("negations"), env=strings("env"),
                        takes_value=bool(item["takes_value"]), preset_only=bool(item["preset_only"]))
