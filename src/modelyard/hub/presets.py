"""A Hugging Face repository's own `preset.ini`, used as llama-server b11434 uses it: `llama-server -hf org/repo`
(no model) where the repository's root holds `preset.ini` downloads that file alone and serves it as router mode's
`--models-preset` (common/download.cpp: a preset.ini at the root wins over any GGUF there; arg.cpp: the model is
cleared, so the server starts as a router; the tag, if any, is ignored). The router's other flags still override
every section, as for a local preset. Offline, or when the hub cannot be listed, the cached copy is used.

modelyard does the same with `modelyard serve -hf org/repo`, with two refusals where router mode would do
something silently: `-hf` together with `--models-preset` (router mode drops the local file), and `-hf` on a
repository without a preset.ini (router mode then serves that one model alone, which modelyard is not: it says
how to add the model instead). A downloaded preset may not use modelyard's own `cmd` key: a file from the
network must not choose a program to run on this host.

Elsewhere router mode does nothing useful with a preset repository (POST /models fetches its preset.ini and lists
nothing; a section's `hf-repo` naming one starts a child that is a router itself): refs.py's message says to use
`-hf` on the command line instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from modelyard.config.options import OptionTable
from modelyard.config.presets import ConfigError, PresetFile, read_preset_file
from modelyard.hub.access import Hub, hub_from_environ, router_access
from modelyard.hub.cache import cached_files
from modelyard.hub.fetch import HubError, fetch, list_repo
from modelyard.hub.refs import PRESET_FILE, HubRef, RefError, is_preset_repo, parse_ref

log = logging.getLogger(__name__)

HUB_REPO_FLAG = "--hf-repo"  # the canonical spelling of -hf / -hfr / LLAMA_ARG_HF_REPO
# Its spellings in b11434's --help, for the CLI's one look before the option table is loaded (names_hub_repo).
_HUB_REPO_SPELLINGS = ("-hf", "-hfr", HUB_REPO_FLAG)
_REFUSED_KEYS = {"cmd": "it runs a command of the file's choosing on this host"}


def names_hub_repo(args: Sequence[str]) -> bool:
    """Whether the router's command line has `-hf` (`-hf org/repo`, `--hf-repo=org/repo`): then the presets come
    from that repository, and no models directory is implied."""
    return any(arg.partition("=")[0] in _HUB_REPO_SPELLINGS for arg in args)


def take_preset_repo(router_settings: Mapping[str, str],
                     models_preset: Path | None) -> tuple[HubRef | None, dict[str, str]]:
    """The router command line's `-hf org/repo` (canonical `--hf-repo`) taken out of its per-model defaults,
    which it would otherwise be for every model; None when there is none. Given with --models-preset, or not a
    Hugging Face reference, it is a ConfigError saying what to write."""
    rest = dict(router_settings)
    text = rest.pop(HUB_REPO_FLAG, None)
    if text is None:
        return None, rest
    if models_preset is not None:
        raise ConfigError(f"-hf {text} and --models-preset {models_preset} both name the presets: give one "
                          f"(llama-server would use the repository's preset.ini and ignore the file)")
    try:
        ref = parse_ref(text)
    except RefError as exc:
        raise ConfigError(f"-hf: {exc}") from None
    return HubRef(ref.repo), rest  # the tag names no quant of a preset repository: router mode ignores it


def remote_preset_problem(preset: PresetFile, repo: str) -> str | None:
    """Why a preset downloaded from `repo` is refused, or None."""
    sections = [("*", preset.global_settings), *((name, s.settings) for name, s in preset.sections.items())]
    for name, settings in sections:
        for key, why in _REFUSED_KEYS.items():
            if key in settings:
                return (f"the preset.ini of {repo} sets `{key}` in [{name}] ({settings[key].origin}): modelyard "
                        f"refuses it in a downloaded preset, as {why}; copy the file, check it and pass it with "
                        f"--models-preset instead")
    return None


def cached_preset(cache: Path, repo: str) -> Path | None:
    """The repository's preset.ini in the Hugging Face cache (its snapshot entry), if it is there whole."""
    return next((f.local for f in cached_files(cache, repo) if f.path == PRESET_FILE), None)


def fetch_preset(hub: Hub, ref: HubRef) -> Path:
    """The repository's preset.ini, downloaded into the cache (blocking: called once at start). Offline, or
    when the hub cannot list the repository, the cached copy, with a warning that says why; a repository
    without a preset.ini is a ConfigError that says how to serve its models instead. Router mode's warning
    about remote presets is logged either way."""
    path = _preset_path(hub, ref)
    log.warning("using %s from Hugging Face repo %s (%s): only use presets you can trust, an unknown preset may "
                "be unsafe", PRESET_FILE, ref.repo, path)
    return path


def _preset_path(hub: Hub, ref: HubRef) -> Path:
    cached = cached_preset(hub.cache, ref.repo)
    if hub.offline and cached is not None:
        return cached
    try:
        listing = list_repo(hub, ref.repo)
    except HubError as exc:
        if cached is None:
            raise
        log.warning("the hub did not list %s, so its cached %s is used: %s", ref.repo, PRESET_FILE, exc.message)
        return cached
    if not is_preset_repo(listing.paths):
        raise ConfigError(f"{ref.repo} has no {PRESET_FILE} at its root, so -hf on modelyard's command line cannot "
                          f"serve it (llama-server would serve this one model alone): name it in a --models-preset "
                          f"section (`hf-repo = {ref.repo}`), or fetch it with `modelyard pull {ref.repo}` once "
                          f"modelyard runs (it is then listed from the Hugging Face cache)")
    return fetch(hub, listing.file(PRESET_FILE), lambda done, total: None, threading.Event())


def router_presets(router_settings: Mapping[str, str], models_preset: Path | None,
                   table: OptionTable) -> tuple[Path | None, dict[str, str]]:
    """The --models-preset to serve and the router's per-model defaults: with `-hf org/repo` on the command
    line, the repository's preset.ini (fetched with the router's --hf-token, from the cache only under
    --offline) and the defaults without -hf; else both as given."""
    ref, rest = take_preset_repo(router_settings, models_preset)
    if ref is None:
        return models_preset, rest
    token, offline = router_access(rest)
    hub = hub_from_environ(token=token)
    if offline:
        hub = replace(hub, offline=True)
    path = fetch_preset(hub, ref)
    problem = remote_preset_problem(read_preset_file(path, table), ref.repo)
    if problem:
        raise ConfigError(problem)
    return path, rest
