"""What every HTTP front-end shares: the manager, the server settings, and the activity records and metrics
that every model request feeds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from modelyard.activity import Activity
from modelyard.api.auth import ApiKey
from modelyard.api.cors import CorsPolicy
from modelyard.engine.webui import WebUi
from modelyard.manager import ModelManager
from modelyard.metrics import Metrics


@dataclass(frozen=True)
class ServerSettings:
    autoload: bool = True
    api_keys: tuple[ApiKey, ...] = ()  # none = no key needed, full access
    cors: CorsPolicy = field(default_factory=CorsPolicy.from_settings)
    bind_host: str = "127.0.0.1"  # decides whether Host is checked (loopback binds refuse foreign names)
    allowed_hosts: tuple[str, ...] = ()  # --allowed-hosts; `*` = any
    max_body_bytes: int = 256 * 2**20
    send_loading_state: bool = False  # --send-loading-state (api/loading.py)
    build_info: str = ""
    webui: WebUi | None = None  # llama.cpp's web UI, served at / (api/ui.py); None: / sends browsers to /ui
    api_prefix: str = ""  # --api-prefix: every route is served under it (api/app.py)
    started_at: float = field(default_factory=time.time)


@dataclass
class AppContext:
    manager: ModelManager
    settings: ServerSettings
    activity: Activity = field(default_factory=Activity)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.manager, self.activity)  # counts each request as its record ends


CONTEXT = web.AppKey("modelyard", AppContext)
SETTINGS = web.AppKey("modelyard.settings", ServerSettings)
