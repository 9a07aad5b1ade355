"""The model catalog: Hugging Face cache entries, models-dir entries and preset sections merged with router
mode's precedence.

Precedence per model: router command line > model section > `[*]`; a preset section extends a models-dir
entry of the same name, which replaces a cache entry of the same name. Names coming from requests are only
looked up here; they are never used as paths.

A model from the hub (`hf-repo = org/repo[:quant]`, with `hf-file` and `hf-token`, as llama-server takes
them; or a cache entry, named `org/repo:QUANT` as router mode names them) is started with `-m` on its cached
file: its child never downloads (the engine is built without a downloader). Until the file is in the cache
the model has no path, and its first load downloads it (modelyard.hub).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelyard.config.durations import parse_duration
from modelyard.config.models_dir import scan_models_dir
from modelyard.config.options import FALSEY, TRUTHY, OptionTable, refusal, value_error
from modelyard.config.presets import ConfigError, PresetFile, Setting, normalise_value, read_preset_file
from modelyard.hub.access import Token
from modelyard.hub.cache import CachedFile, cache_dir, cached_files, cached_models, resolve
from modelyard.hub.refs import HubRef, RefError, parse_ref

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 10.0
MODEL_SOURCE_KEYS = ("model", "hf-repo", "model-url", "docker-repo", "cmd")
PATH_KEYS = ("model", "mmproj", "spec-draft-model")
# Never passed to a child: the router owns them, or (alias) sets them itself.
_ROUTER_FLAGS_IN_ENGINE_ARGS = ("--host", "--port", "--api-key", "--models-dir", "--models-preset",
                                "--models-max", "--models-autoload", "--alias", "--model", "--api-prefix")
HUB_KEYS = ("hf-repo", "hf-file", "hf-token")  # read by modelyard (modelyard.hub), never passed to a child
# api-prefix: children are reached only through modelyard, on the path without it (api/app.py)
ROUTER_ONLY_KEYS = ("api-key", "api-key-file", "ssl-key-file", "ssl-cert-file", "models-dir", "models-max",
                    "models-preset", "models-autoload", "host", "port", "alias", "tags", "log-file", "api-prefix")


Source = Literal["preset", "models_dir", "cache"]


@dataclass(frozen=True)
class HubSource:
    """Where a model's file comes from on the Hugging Face hub, and the token to fetch it with."""

    ref: HubRef
    token: Token | None = None
    mmproj: bool = True  # fetch and pass the repo's projector too (off with no-mmproj or an explicit mmproj)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to start and describe one model."""

    name: str
    settings: Mapping[str, str]  # canonical engine flag (`--ctx-size`) -> value, router-only keys removed
    source: Source
    origin: str
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    load_on_startup: bool = False
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    command: str | None = None
    keep_alive: float | None = None  # seconds idle before unloading; None = the server default; <0 never
    pinned: bool = False
    priority: int = 0
    concurrency_limit: int = 0
    load_timeout: float | None = None  # seconds a load may take; None = --load-timeout; 0 = no limit
    replicas: int = 1  # how many nodes of a cluster hold it once it is used (serve --ray); one node ignores it
    hub: HubSource | None = None  # a model from the hub; `--model` is its cached file once downloaded
    preset_text: str = field(default="", compare=False)

    @property
    def model_path(self) -> str | None:
        return self.settings.get("--model")

    @property
    def has_projector(self) -> bool:
        """Whether the model reads images: it is started with an mmproj file (from --models-dir or the preset)."""
        return "--mmproj" in self.settings

    def serves_embeddings(self, environ: Mapping[str, str]) -> bool:
        """Whether its child answers the embedding endpoints. llama-server answers 501 "start it with
        `--embeddings`" otherwise, which a modelyard user cannot do; so modelyard refuses before loading.
        `--reranking` turns embeddings on in llama-server too, and children inherit the router's environment
        (`environ`), so LLAMA_ARG_EMBEDDINGS there counts. Another engine (`cmd`) may serve them: we cannot
        know, so it is not refused."""
        if self.command is not None:
            return True
        flags = (self.settings.get("--embeddings"), self.settings.get("--reranking"),
                 environ.get("LLAMA_ARG_EMBEDDINGS"), environ.get("LLAMA_ARG_RERANKING"))
        return any(value is not None and value.lower() in TRUTHY for value in flags)

    @property
    def needs_download(self) -> bool:
        """A hub model whose file is not in the cache yet: its load downloads it first."""
        return self.hub is not None and self.model_path is None

    def launch_signature(self) -> tuple[object, ...]:
        """What decides how the child is started: a change means a running instance must be restarted."""
        return (tuple(sorted(self.settings.items())), self.command, self.hub.ref if self.hub else None)


@dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelConfig]
    by_name: Mapping[str, str]  # name or alias -> canonical name

    def resolve(self, name: str) -> ModelConfig | None:
        canonical = self.by_name.get(name)
        return self.models[canonical] if canonical is not None else None


@dataclass(frozen=True)
class Sources:
    """Where the catalog is read from; kept so `GET /models?reload=1` can read it again."""

    table: OptionTable
    models_dir: Path | None = None
    preset_path: Path | None = None
    router_settings: Mapping[str, str] = field(default_factory=dict)
    hub_cache: Path | None = None  # the Hugging Face cache whose GGUF models are listed; None = not listed

    def load(self) -> Catalog:
        return build_catalog(self)


def build_catalog(sources: Sources) -> Catalog:
    table = sources.table
    canon = {key: _canonical(table, key) for key in (*MODEL_SOURCE_KEYS, *PATH_KEYS, *ROUTER_ONLY_KEYS,
                                                     *HUB_KEYS, "load-on-startup", "stop-timeout", "mmproj-auto",
                                                     "mmproj-url")}
    preset = read_preset_file(sources.preset_path, table) if sources.preset_path else None
    global_settings = preset.global_settings if preset else {}
    cache = sources.hub_cache or cache_dir(os.environ)
    hub_files = cached_files(cache) if sources.hub_cache or _names_hub_model(preset, canon) else []

    merged: dict[str, tuple[dict[str, Setting], Source, str]] = {}
    if sources.hub_cache is not None:
        for ref in cached_models(hub_files):  # router mode's cache entries: `hf-repo = org/repo:QUANT`
            where = f"{cache} ({ref.name})"
            merged[ref.name] = ({canon["hf-repo"]: Setting(ref.name, where)}, "cache", where)
    if sources.models_dir is not None:
        for local in scan_models_dir(sources.models_dir):
            where = f"{sources.models_dir} ({local.path.name})"
            settings = {canon["model"]: Setting(str(local.path), where)}
            if local.mmproj:
                settings[canon["mmproj"]] = Setting(str(local.mmproj), where)
            if local.draft:
                settings[canon["spec-draft-model"]] = Setting(str(local.draft), where)
            merged[local.name] = (settings, "models_dir", where)
    if preset:
        for name, section in preset.sections.items():
            base = merged[name][0] if name in merged else {}
            merged[name] = ({**base, **section.settings}, "preset", section.origin)

    router = {flag: Setting(value, "router command line") for flag, value in sources.router_settings.items()}
    models: dict[str, ModelConfig] = {}
    dedup: set[str] = set()  # files of presets with `dedup-cache-models`: their cache entries are not listed
    for name, (settings, source, origin) in merged.items():
        full = _with_hub_files({**global_settings, **settings, **router}, name, canon, hub_files)
        models[name] = _model_config(name, full, source, origin, canon, preset)
        flag = full.get("dedup-cache-models")
        if source == "preset" and flag is not None and flag.value.lower() in TRUTHY and models[name].hub:
            dedup.add(models[name].model_path or "")
    models = {name: config for name, config in models.items()
              if config.source != "cache" or config.model_path not in dedup}
    return Catalog(models, _name_index(models.values()))


# The origin of a path resolved in the Hugging Face cache: it keeps its snapshot path (router mode passes that
# one; the blob it links to is named by its sha256), where other paths are resolved through symlinks.
_CACHED = " (in the Hugging Face cache)"


def _names_hub_model(preset: PresetFile | None, canon: Mapping[str, str]) -> bool:
    if preset is None:
        return False
    return canon["hf-repo"] in preset.global_settings or any(canon["hf-repo"] in s.settings
                                                             for s in preset.sections.values())


def hub_source(full: Mapping[str, Setting], name: str, canon: Mapping[str, str]) -> HubSource | None:
    """The model's `hf-repo` / `hf-file` / `hf-token`, checked (ConfigError with the file and line)."""
    repo = full.get(canon["hf-repo"])
    if repo is None:
        return None
    file = full.get(canon["hf-file"])
    try:
        ref = parse_ref(repo.value, file.value if file else "")
    except RefError as exc:
        raise ConfigError(f"{repo.origin} [{name}]: hf-repo: {exc}") from None
    token = full.get(canon["hf-token"])
    explicit = canon["mmproj"] in full or canon["mmproj-url"] in full
    auto = full.get(canon["mmproj-auto"])
    return HubSource(ref, Token(token.value, f"hf-token in [{name}] ({token.origin})") if token else None,
                     mmproj=not explicit and (auto is None or auto.value.lower() in TRUTHY))


def _with_hub_files(full: dict[str, Setting], name: str, canon: Mapping[str, str],
                    hub_files: list[CachedFile]) -> dict[str, Setting]:
    """A hub model's settings with `--model` (and `--mmproj`) on its cached files, when they are cached."""
    source = hub_source(full, name, canon)
    if source is None or canon["model"] in full:  # an explicit model path wins, as in llama-server
        return full
    found = resolve(hub_files, source.ref, source.mmproj)
    if found is None:
        return full
    where = f"{found.model.parent}{_CACHED}"
    full = {**full, canon["model"]: Setting(str(found.model), where)}
    if found.mmproj is not None:
        full[canon["mmproj"]] = Setting(str(found.mmproj), where)
    return full


def _canonical(table: OptionTable, key: str) -> str:
    option = table.lookup(key)
    return option.canonical if option else f"--{key}"


def _model_config(name: str, full: Mapping[str, Setting], source: Source,
                  origin: str, canon: Mapping[str, str], preset: PresetFile | None) -> ModelConfig:
    where = f"{origin} [{name}]"
    if not any(canon[key] in full for key in MODEL_SOURCE_KEYS):
        raise ConfigError(f"{where}: model '{name}' has no model source; set `model = /path/to/file.gguf` "
                          f"(or hf-repo, model-url, cmd)")
    for key in PATH_KEYS:
        setting = full.get(canon[key])
        if setting is not None:
            path = Path(setting.value).expanduser()
            if not path.is_file():
                raise ConfigError(f"{setting.origin} [{name}]: {key} file '{setting.value}' does not exist")
    command = full.get("cmd")
    if command is not None:
        try:
            if not shlex.split(command.value):
                raise ValueError("it is empty")
        except ValueError as exc:
            raise ConfigError(f"{command.origin} [{name}]: cmd {command.value!r} is not a usable command line "
                              f"({exc})") from None
    values = {flag: s.value for flag, s in full.items()}
    router_only = {canon[key] for key in (*ROUTER_ONLY_KEYS, *HUB_KEYS)}
    preset_only = {canon["load-on-startup"], canon["stop-timeout"], *_SCHEDULING_KEYS, "dedup-cache-models",
                   "cmd"}
    settings = {flag: value if full[flag].origin.endswith(_CACHED) else _absolute(flag, value, canon)
                for flag, value in values.items() if flag not in router_only and flag not in preset_only}
    return ModelConfig(
        name=name,
        settings=settings,
        source=source,
        origin=origin,
        aliases=_split(values.get(canon["alias"], "")),
        tags=_split(values.get(canon["tags"], "")),
        load_on_startup=values.get(canon["load-on-startup"], "false").lower() in TRUTHY,
        stop_timeout=_stop_timeout(values.get(canon["stop-timeout"]), where),
        command=values.get("cmd"),
        **_scheduling(full, name),
        hub=hub_source(full, name, canon),
        preset_text=_render_preset(name, values, secret=canon["hf-token"]),
    )


_SCHEDULING_KEYS = ("keep-alive", "pin", "priority", "concurrency-limit", "load-timeout", "replicas")


def _scheduling(full: Mapping[str, Setting], name: str) -> dict[str, Any]:
    """modelyard's own preset keys: keep-alive (seconds or 5m; -1 = never unload), pin, priority,
    concurrency-limit, load-timeout (seconds or 10m; 0 or -1 = no limit), replicas (1 or more: the copies a
    cluster keeps once the model is used; a single node has one copy and ignores it)."""
    out: dict[str, Any] = {}
    for key in _SCHEDULING_KEYS:
        setting = full.get(key)
        if setting is None:
            continue
        try:
            if key == "keep-alive":
                out["keep_alive"] = parse_duration(setting.value, "keep-alive")
            elif key == "load-timeout":
                out["load_timeout"] = max(0.0, parse_duration(setting.value, "load-timeout"))
            elif key == "pin":
                if setting.value.lower() not in TRUTHY | FALSEY:
                    raise ValueError("expected true or false")
                out["pinned"] = setting.value.lower() in TRUTHY
            else:
                number = _whole(setting.value)
                if key == "concurrency-limit" and number < 0:
                    raise ValueError("must be 0 (no limit) or more")
                if key == "replicas" and number < 1:
                    raise ValueError("must be 1 or more (the nodes of a cluster that hold the model)")
                out[key.replace("-", "_")] = number
        except ValueError as exc:
            raise ConfigError(f"{setting.origin} [{name}]: {key} = {setting.value!r}: {exc}") from None
    return out


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _absolute(flag: str, value: str, canon: Mapping[str, str]) -> str:
    if flag in {canon[key] for key in PATH_KEYS}:
        return str(Path(value).expanduser().resolve())
    return value


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _stop_timeout(value: str | None, where: str) -> float:
    if value is None:
        return DEFAULT_STOP_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        log.warning("%s: invalid stop-timeout %r, using %.0f s", where, value, DEFAULT_STOP_TIMEOUT)
        return DEFAULT_STOP_TIMEOUT
    return seconds


def _render_preset(name: str, values: Mapping[str, str], secret: str) -> str:
    """The preset as GET /models shows it; the hub token's value is never shown."""
    shown = {flag: "(hidden)" if flag == secret else value for flag, value in values.items()}
    lines = [f"[{name}]"] + [f"{flag.lstrip('-')} = {value}" for flag, value in sorted(shown.items())]
    return "\n".join(lines) + "\n"


def _name_index(models: Iterable[ModelConfig]) -> dict[str, str]:
    index: dict[str, str] = {}
    owners: dict[str, str] = {}
    for model in models:
        for name in (model.name, *model.aliases):
            if name in index and index[name] != model.name:
                other = owners[name]
                raise ConfigError(f"{model.origin} [{model.name}]: name '{name}' is already used by {other}; "
                                  f"model names and aliases must be unique")
            index[name] = model.name
            owners[name] = f"{model.origin} [{model.name}]"
    return index


def parse_engine_args(args: tuple[str, ...], table: OptionTable) -> dict[str, str]:
    """`-c 4096 --no-mmap --flash-attn=on` -> {"--ctx-size": "4096", ...}, checked against llama-server."""
    settings: dict[str, str] = {}
    queue = list(args)
    while queue:
        arg = queue.pop(0)
        key, has_value, inline = arg.partition("=")
        option = table.lookup(key) if key.startswith("-") else None
        if option is None or option.preset_only:
            raise ConfigError(f"unknown option '{arg}': not a modelyard flag nor a llama-server flag "
                              f"(see `modelyard serve --help` and `llama-server --help`)")
        if option.canonical in _ROUTER_FLAGS_IN_ENGINE_ARGS:
            raise ConfigError(f"'{key}' cannot be a per-model default")
        if option.takes_value:
            if not has_value:
                if not queue:
                    raise ConfigError(f"option '{key}' needs a value")
                inline = queue.pop(0)
            problem = value_error(option.canonical, inline)
            if problem:
                raise ConfigError(problem)
            settings[option.canonical] = inline
        else:
            settings[option.canonical] = normalise_value(table, key, "true")
        problem = refusal(option, key, settings[option.canonical])
        if problem:
            raise ConfigError(problem)
    return settings
