"""API keys and what each may do: the key model, the keys file, the constant-time lookup, and the one table
that says which scope each route needs.

Scopes: `read` (listings), `inference` (model routes), `admin` (load, unload, reload and every other
management action; it implies the other two). A key may also be limited to model-name patterns (fnmatch-style,
matched against a model's canonical name and its aliases); listings then show only those models. Keys from
`--api-key`, `LLAMA_API_KEY` or a one-key-per-line file have every scope and every model; a `.toml` keys file
gives each key its own scopes and models:

    [[key]]
    name = "ci"                  # optional: how logs and errors name the key (the secret never appears)
    key_env = "CI_MODELYARD_KEY" # or key = "..."
    scopes = ["inference", "read"]
    models = ["smol*", "gemma3-270m"]

The middleware (api/app.py) authenticates each request and puts the key on it (`API_KEY`: None when no keys are
configured, which means full access); handlers that know the model ask `may_use` / `require_model`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from aiohttp import web

from modelyard.config.catalog import Catalog, ModelConfig
from modelyard.config.presets import ConfigError
from modelyard.errors import ErrorKind, ModelError


class Scope(Enum):
    READ = "read"
    INFERENCE = "inference"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)
_SCOPE_NAMES = ", ".join(s.value for s in Scope)


@dataclass(frozen=True)
class ApiKey:
    """One key. `secret` is kept out of repr so that logging a key (or a traceback holding one) never shows it."""

    secret: str = field(repr=False)
    scopes: frozenset[Scope] = ALL_SCOPES
    models: tuple[str, ...] = ()  # fnmatch patterns; empty = every model
    label: str = "key"  # where it came from, for messages: `--api-key`, `keys.toml entry 2 ("ci")`

    def has(self, scope: Scope) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the secret, which find_key compares; hashed once, not on every request."""
        return hashlib.sha256(self.secret.encode()).digest()

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of a model's names (canonical name, aliases) matches one of the key's patterns."""
        if not self.scopes:
            return False
        if not self.models:
            return True
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.models)


API_KEY: web.RequestKey[ApiKey | None] = web.RequestKey("modelyard.api_key")


# --- the lookup -------------------------------------------------------------------------------------------

def offered_key(headers: Mapping[str, str]) -> str | None:
    """The key a request offers: `Authorization: Bearer K` (OpenAI clients) or `X-Api-Key: K` (Anthropic's)."""
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("X-Api-Key")


def find_key(keys: Iterable[ApiKey], offered: str | None) -> ApiKey | None:
    """The key matching `offered`, in constant time: every key is compared (no early exit that would tell
    which key matched), over SHA-256 digests so that compare_digest never leaks a key's length either."""
    if offered is None:
        return None
    digest = hashlib.sha256(offered.encode()).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


# --- the route -> scope table (the only place that says which route needs what) --------------------------

def _reload(query: Mapping[str, str]) -> bool:
    return query.get("reload") in ("1", "true")


def _has_model(query: Mapping[str, str]) -> bool:
    return bool(query.get("model"))


def _always(query: Mapping[str, str]) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]  # empty = any method
    path: str  # exact, or a prefix when it ends in `/*`
    scope: Scope | None  # None = open, no key needed
    when: Callable[[Mapping[str, str]], bool] = _always  # a condition on the query string

    def covers(self, method: str, path: str) -> bool:
        """Whether the rule is about this method and (canonical) path; `when` then decides on the query."""
        if self.methods and method not in self.methods:
            return False
        return path.startswith(self.path[:-1]) if self.path.endswith("/*") else path == self.path


_GET, _POST, _ANY = frozenset({"GET"}), frozenset({"POST"}), frozenset[str]()
_INFERENCE_POSTS = (  # llama-server's model-routed POST routes (api/openai.py) and Ollama's model routes
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions", "/completion",
    "/v1/embeddings", "/embeddings", "/embedding", "/v1/rerank", "/rerank", "/v1/reranking", "/reranking",
    "/v1/responses", "/responses", "/v1/messages", "/v1/messages/count_tokens", "/infill", "/tokenize",
    "/detokenize", "/apply-template", "/v1/chat/completions/input_tokens", "/v1/responses/input_tokens",
    "/chat/completions/input_tokens", "/responses/input_tokens", "/v1/chat/completions/control", "/v1/systemone",
    "/v1/audio/transcriptions", "/audio/transcriptions",
    "/v1/streams/lookup",  # resumable streams (api/streams.py): they reach the conversation's child
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
)
ROUTE_SCOPES: tuple[Rule, ...] = (
    Rule(_ANY, "/health", None),
    Rule(_ANY, "/v1/health", None),
    # the dashboard's page and assets hold no data (its data calls carry the key), as router mode's web UI
    Rule(_GET, "/ui", None),
    Rule(_GET, "/ui/*", None),
    # "Ollama is running", or for a browser llama.cpp's web UI or a redirect to /ui: no data, and a browser
    # opening the server's address must reach a key prompt instead of a 401 (Ollama's clients probe it too)
    Rule(_GET, "/", None),
    # llama.cpp's web UI: its service worker (or the one that removes it), and its files through `public`
    Rule(_GET, "/sw.js", None),
    # management: what changes which models run or a child's shared state affects every user of that model
    Rule(_GET, "/models", Scope.ADMIN, _reload),
    Rule(_GET, "/v1/models", Scope.ADMIN, _reload),
    Rule(_POST, "/models/load", Scope.ADMIN),
    Rule(_POST, "/models/unload", Scope.ADMIN),
    Rule(frozenset({"POST", "DELETE"}), "/models", Scope.ADMIN),  # Hugging Face downloads (api/downloads.py)
    Rule(_POST, "/props", Scope.ADMIN),  # sets a child's default generation settings
    Rule(_POST, "/slots/*", Scope.ADMIN),  # saves, restores or erases a child's slots (files on disk)
    Rule(_POST, "/lora-adapters", Scope.ADMIN),  # changes the adapter scales every request gets
    Rule(_POST, "/activity/*", Scope.ADMIN),  # cancels someone's request
    Rule(_ANY, "/capture", Scope.ADMIN),  # shows (or starts recording) everyone's prompts and answers
    # always 403 (api/disabled.py); where llama-server enables them they run commands on the host
    Rule(_ANY, "/tools", Scope.ADMIN),
    Rule(_ANY, "/cors-proxy", Scope.ADMIN),
    *(Rule(_ANY, path, Scope.ADMIN) for path in ("/api/pull", "/api/push", "/api/create", "/api/copy",
                                                  "/api/delete", "/api/blobs/*")),
    # inference: the model routes
    *(Rule(_POST, path, Scope.INFERENCE) for path in _INFERENCE_POSTS),
    *(Rule(_GET, path, Scope.INFERENCE, _has_model) for path in ("/props", "/slots", "/metrics", "/lora-adapters")),
    Rule(_GET, "/slots", Scope.INFERENCE),  # without ?model= they answer 400 saying so
    Rule(_GET, "/metrics", Scope.READ),  # the router's own metrics (Prometheus), per key's models
    Rule(_GET, "/lora-adapters", Scope.INFERENCE),
    Rule(frozenset({"GET", "DELETE"}), "/v1/stream", Scope.INFERENCE),  # replay or stop a conversation's stream
    # read: listings
    *(Rule(_GET, path, Scope.READ) for path in ("/models", "/v1/models", "/v1/models/*", "/models/sse",
                                                "/props", "/api/tags", "/api/ps", "/api/version", "/activity",
                                                "/activity/sse")),
    *(Rule(_GET, path, Scope.READ) for path in ("/decisions", "/decisions/sse", "/logs/*")),
    Rule(_POST, "/api/show", Scope.READ),
)
DEFAULT_SCOPE = Scope.READ  # a path in no rule is answered 404 by its handler; any valid key may learn that

_SLASHES = re.compile(r"//+")


def canonical_path(path: str) -> str:
    """`//api/tags` and `/v1/models/` as the paths they are served as (api/app.py's tolerant routing): the
    scope must be decided on the path that will be served, or `//models/load` would walk around `admin`."""
    return _SLASHES.sub("/", path).rstrip("/") or "/"


def matching_rule(method: str, path: str, query: Mapping[str, str]) -> Rule | None:
    return next((rule for rule in _covering(method, path) if rule.when(query)), None)


# With keys, every request walked the table (6 to 8 µs a request, 2 to 3% of the router's CPU per proxied
# request); the rules that cover a method and path are the same each time. Bounded: unknown paths only churn it.
@lru_cache(maxsize=512)
def _covering(method: str, path: str) -> tuple[Rule, ...]:
    """The rules about `method path`, in the table's order (the first whose `when` holds decides)."""
    method = "GET" if method == "HEAD" else method
    path = canonical_path(path)
    return tuple(rule for rule in ROUTE_SCOPES if rule.covers(method, path))


def required_scope(method: str, path: str, query: Mapping[str, str]) -> Scope | None:
    """The scope a request needs; None = open (health checks)."""
    rule = matching_rule(method, path, query)
    return DEFAULT_SCOPE if rule is None else rule.scope


# --- what the middleware decides ----------------------------------------------------------------------------

ANONYMOUS = ApiKey("", frozenset(), label="no key")  # an open route's caller without a valid key: may do nothing


@dataclass(frozen=True)
class Refusal:
    status: int  # 401: no key or a wrong one; 403: a key outside its scope
    message: str


def authorise(keys: tuple[ApiKey, ...], headers: Mapping[str, str], method: str, path: str,
              query: Mapping[str, str], public: frozenset[str] = frozenset()) -> ApiKey | Refusal | None:
    """The key a request is served under (None: no keys configured, full access), or why it is refused.
    `public`: the web UI's files (api/ui.py), open to GET as router mode's UI assets are; they hold no data."""
    if not keys:
        return None
    public_file = method in ("GET", "HEAD") and canonical_path(path) in public
    scope = None if public_file else required_scope(method, path, query)
    key = find_key(keys, offered_key(headers))
    if scope is None:
        return key or ANONYMOUS
    if key is None:
        return Refusal(401, "Invalid API Key")
    lacking = scope_refusal(key, scope, method, path)
    return key if lacking is None else Refusal(403, lacking)


def scope_refusal(key: ApiKey, scope: Scope, method: str, path: str) -> str | None:
    """Why `key` may not call `method path`, which needs `scope` (None: it may)."""
    if key.has(scope):
        return None
    return f"this API key ({key.label}) lacks the '{scope.value}' scope needed for {method} {canonical_path(path)}"


# --- what handlers ask, once they know the model ------------------------------------------------------------

def model_names(config: ModelConfig) -> tuple[str, ...]:
    return (config.name, *config.aliases)


def may_use(request: web.Request, config: ModelConfig) -> bool:
    """Whether the request's key may use (or see) this model. Raises KeyError if the API key middleware did
    not run: a handler must never take a missing key for full access."""
    key = request[API_KEY]
    return key is None or key.may_use(model_names(config))


def may_use_named(request: web.Request, catalog: Catalog, name: str) -> bool:
    """For a model known by its canonical name (a status event); one a reload just removed is matched by
    that name alone."""
    config = catalog.models.get(name)
    if config is not None:
        return may_use(request, config)
    key = request[API_KEY]
    return key is None or key.may_use((name,))


def require_named(request: web.Request, name: str, resolve: Callable[[str], ModelConfig]) -> None:
    """`require_model` for a model known by a requested name: resolved only when the key is limited to some
    models, so that for every other request the handler's own checks keep their order."""
    key = request[API_KEY]
    if key is not None and (key.models or not key.scopes):
        require_model(request, resolve(name))


def require_model(request: web.Request, config: ModelConfig) -> None:
    """Raise a 403 ModelError naming the model if the request's key may not use it."""
    if not may_use(request, config):
        key = request[API_KEY]
        assert key is not None
        raise ModelError(ErrorKind.FORBIDDEN, f"this API key ({key.label}) may not use model '{config.name}' "
                                              f"(it may use: {', '.join(key.models)})")


# --- the keys file ------------------------------------------------------------------------------------------

_ENTRY_FIELDS = frozenset({"key", "key_env", "name", "scopes", "models"})


def keys_from_list(value: str | None, label: str) -> tuple[ApiKey, ...]:
    """`--api-key K1,K2` / LLAMA_API_KEY: full-access keys."""
    return tuple(ApiKey(k.strip(), label=label) for k in (value or "").split(",") if k.strip())


def read_keys_file(path: Path, environ: Mapping[str, str] | None = None) -> tuple[ApiKey, ...]:
    """A `.toml` keys file (scoped keys) or one key per line (`#` comments; full access). ConfigError names
    the file, the line or entry, and what is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API keys file: {exc}") from None
    if path.suffix.lower() == ".toml":
        return parse_toml_keys(text, str(path), os.environ if environ is None else environ)
    return parse_plain_keys(text, str(path))


def parse_plain_keys(text: str, where: str) -> tuple[ApiKey, ...]:
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        secret = line.strip()
        if secret and not secret.startswith("#"):
            keys.append(ApiKey(secret, label=f"{Path(where).name} line {number}"))
    return tuple(keys)


def parse_toml_keys(text: str, where: str, environ: Mapping[str, str]) -> tuple[ApiKey, ...]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"key"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; each key is a [[key]] table")
    entries = document.get("key", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: no keys; add [[key]] tables with key (or key_env) and scopes")
    keys = [_toml_entry(entry, where, f"[[key]] entry {index}", environ) for index, entry in enumerate(entries, 1)]
    seen: dict[str, str] = {}
    for key in keys:
        if key.secret in seen:  # which scopes applied would depend on the order of the entries
            raise ConfigError(f"{where}: {key.label} has the same key as {seen[key.secret]}; "
                              f"each key must be distinct")
        seen[key.secret] = key.label
    return tuple(keys)


def _toml_entry(entry: Any, file: str, label: str, environ: Mapping[str, str]) -> ApiKey:
    where = f"{file}: {label}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table ([[key]]), not {type(entry).__name__}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{where}: name must be a non-empty string")
    label = f'{label} "{name}"' if name else label
    where = f"{file}: {label}"
    unknown = sorted(set(entry) - _ENTRY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are "
                          f"{', '.join(sorted(_ENTRY_FIELDS))}")
    secret = _secret(entry, where, environ)
    scopes = entry.get("scopes")
    if scopes is None:
        raise ConfigError(f"{where}: scopes is missing; give a list of {_SCOPE_NAMES}")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where}: scopes must be a non-empty list of {_SCOPE_NAMES}")
    bad = [s for s in scopes if s not in {v.value for v in Scope}]
    if bad:
        raise ConfigError(f"{where}: unknown scope(s) {', '.join(bad)}; the scopes are {_SCOPE_NAMES}")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise ConfigError(f"{where}: models must be a list of model names or patterns (smol*, gemma3-270m)")
    if "models" in entry and not models:
        raise ConfigError(f"{where}: models is empty, so the key could use no model; leave it out for every "
                          f"model or list patterns")
    return ApiKey(secret, frozenset(Scope(s) for s in scopes), tuple(m.strip() for m in models),
                  label=f"{Path(file).name} {label}")


def _secret(entry: Mapping[str, Any], where: str, environ: Mapping[str, str]) -> str:
    if ("key" in entry) == ("key_env" in entry):
        raise ConfigError(f"{where}: give exactly one of key and key_env")
    if "key_env" in entry:
        variable = entry["key_env"]
        if not isinstance(variable, str) or not variable:
            raise ConfigError(f"{where}: key_env must name an environment variable")
        secret = environ.get(variable, "").strip()
        if not secret:
            raise ConfigError(f"{where}: environment variable {variable} (key_env) is not set or empty")
        return secret
    secret = entry["key"]
    if not isinstance(secret, str) or not secret.strip():
        raise ConfigError(f"{where}: key must be a non-empty string")
    if secret != secret.strip() or any(c.isspace() for c in secret):
        raise ConfigError(f"{where}: key contains whitespace, which no client sends in a header")
    return secret
