"""What every HTTP front-end shares: the manager, the upstream client and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from modelyard.manager import ModelManager


@dataclass(frozen=True)
class ServerSettings:
    autoload: bool = True
    api_keys: tuple[str, ...] = ()
    cors_origins: str = "*"  # "*" echoes any Origin (router mode's default), "localhost", or a list
    build_info: str = ""
    started_at: float = field(default_factory=time.time)


@dataclass
class AppContext:
    manager: ModelManager
    settings: ServerSettings
    session: aiohttp.ClientSession | None = None

    def upstream(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the upstream session is created when the app starts"
        return self.session


CONTEXT = web.AppKey("modelyard", AppContext)
