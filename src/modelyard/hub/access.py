"""Where the hub is, which token is sent and whether the network may be used, read from the environment at the
moment of use (tests point HF_ENDPOINT at a fake hub after import), with llama.cpp's precedence:
MODEL_ENDPOINT, then HF_ENDPOINT; a token from `hf-token` (preset or router flag), else HF_TOKEN, else the
token file huggingface_hub writes at login; offline with HF_HUB_OFFLINE or LLAMA_ARG_OFFLINE.

A token is shown only by where it came from, never by its value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.config.options import TRUTHY
from modelyard.hub.cache import cache_dir

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    source: str  # "HF_TOKEN", "hf-token in [chat] (models.ini:4)", "the token file ~/.cache/huggingface/token"


@dataclass(frozen=True)
class Hub:
    endpoint: str
    cache: Path
    offline: bool = False
    token: Token | None = None

    def describe_token(self) -> str:
        return f"the token from {self.token.source}" if self.token else "no token (set HF_TOKEN or hf-token)"


def router_access(settings: Mapping[str, str]) -> tuple[Token | None, bool]:
    """The router command line's `--hf-token` and `--offline` (for every download and a -hf preset fetch)."""
    token = settings.get("--hf-token")
    return (Token(token, "--hf-token") if token else None,
            settings.get("--offline", "false").lower() in TRUTHY)


def hub_from_environ(environ: Mapping[str, str] | None = None, token: Token | None = None) -> Hub:
    env = os.environ if environ is None else environ
    endpoint = (env.get("MODEL_ENDPOINT") or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    offline = any(env.get(var, "").lower() in TRUTHY | {"yes"} for var in ("HF_HUB_OFFLINE", "LLAMA_ARG_OFFLINE"))
    return Hub(endpoint, cache_dir(env), offline, token or environ_token(env))


def environ_token(environ: Mapping[str, str]) -> Token | None:
    if environ.get("HF_TOKEN"):
        return Token(environ["HF_TOKEN"], "HF_TOKEN")
    path = _token_file(environ)
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return Token(value, f"the token file {path}") if value else None


def _token_file(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_TOKEN_PATH"):
        return Path(environ["HF_TOKEN_PATH"]).expanduser()
    home = Path(environ["HF_HOME"]).expanduser() if environ.get("HF_HOME") else None
    if home is None:
        base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else (
            Path(environ.get("HOME") or Path.home()) / ".cache")
        home = base / "huggingface"
    return home / "token"
