"""What every HTTP front-end shares: the manager and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from modelyard.api.auth import ApiKey
from modelyard.api.cors import CorsPolicy
from modelyard.manager import ModelManager


@dataclass(frozen=True)
class ServerSettings:
    autoload: bool = True
    api_keys: tuple[ApiKey, ...] = ()  # none = no key needed, full access
    cors: CorsPolicy = field(default_factory=CorsPolicy.from_settings)
    bind_host: str = "127.0.0.1"  # decides whether Host is checked (loopback binds refuse foreign names)
    allowed_hosts: tuple[str, ...] = ()  # --allowed-hosts; `*` = any
    max_body_bytes: int = 256 * 2**20
    build_info: str = ""
    started_at: float = field(default_factory=time.time)


@dataclass
class AppContext:
    manager: ModelManager
    settings: ServerSettings


CONTEXT = web.AppKey("modelyard", AppContext)
