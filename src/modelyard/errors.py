"""Errors the manager reports to its callers, with the HTTP status and OpenAI error type they map to."""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    """(HTTP status, OpenAI error type, OpenAI error code)."""

    MISSING_MODEL = (400, "invalid_request_error", "model_missing")
    UNKNOWN_MODEL = (404, "invalid_request_error", "model_not_found")
    NOT_LOADED = (400, "invalid_request_error", "model_not_loaded")
    NOT_RUNNING = (400, "invalid_request_error", "model_not_running")
    LOAD_FAILED = (500, "server_error", "model_load_failed")
    QUEUE_FULL = (503, "unavailable_error", "queue_full")
    UPSTREAM = (502, "server_error", "upstream_error")
    BAD_REQUEST = (400, "invalid_request_error", "invalid_request")
    SHUTTING_DOWN = (503, "unavailable_error", "shutting_down")
    UNLOADED = (503, "unavailable_error", "model_unloaded")
    TOO_BIG = (507, "server_error", "model_too_large")
    BUSY = (429, "rate_limit_error", "concurrency_limit")
    TOO_LARGE = (413, "invalid_request_error", "request_too_large")
    NOT_FOUND = (404, "invalid_request_error", "not_found")
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", "method_not_allowed")
    REQUEST_TIMEOUT = (408, "invalid_request_error", "request_timeout")
    UNSUPPORTED_MEDIA = (415, "invalid_request_error", "unsupported_media_type")
    FORBIDDEN = (403, "permission_error", "forbidden")
    CANCELLED = (499, "cancelled_error", "request_cancelled")  # by an admin (POST /activity/{id}/cancel)
    LOADING = (503, "unavailable_error", "model_loading")  # a resumable stream's model is still loading: retry
    FEATURE_DISABLED = (403, "feature_disabled", "feature_disabled")  # router mode's /tools and /cors-proxy answer
    # Hugging Face downloads (modelyard.hub): the hub refused the token, has no such repo/file/quant, cannot be
    # reached (or offline mode is on), the disk is full, or the bytes did not match the hub's sha256.
    HUB_AUTH = (403, "permission_error", "hub_unauthorized")
    HUB_NOT_FOUND = (404, "invalid_request_error", "hub_not_found")
    HUB_UNREACHABLE = (502, "server_error", "hub_unreachable")
    HUB_OFFLINE = (503, "unavailable_error", "hub_offline")
    DISK_FULL = (507, "server_error", "insufficient_storage")
    DOWNLOAD_FAILED = (502, "server_error", "download_failed")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]

    @property
    def code(self) -> str:
        return self.value[2]


class ModelError(Exception):
    """A request could not be served; `kind` decides the HTTP answer."""

    def __init__(self, kind: ErrorKind, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
