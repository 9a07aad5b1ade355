"""What every HTTP front-end shares: the manager and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from modelyard.api.cors import CorsPolicy
from modelyard.manager import ModelManager


@dataclass(frozen=True)
class ServerSettings:
    autoload: bool = True
    api_keys: tuple[str, ...] = ()
    cors: CorsPolicy = field(default_factory=CorsPolicy.from_settings)
    max_body_bytes: int = 256 * 2**20
    build_info: str = ""
    started_at: float = field(default_factory=time.time)


@dataclass
class AppContext:
    manager: ModelManager
    settings: ServerSettings


CONTEXT = web.AppKey("modelyard", AppContext)
