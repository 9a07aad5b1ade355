"""Keep-alive durations, parsed as leniently as clients send them: 300, "300", "5m", "1h30m", "-1", "-1m"."""

from __future__ import annotations

import re

_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds; a negative value means forever. Raises ValueError with a message that says what to send."""
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a number of seconds or a duration like \"5m\", not {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"keep_alive must be a number of seconds or a duration like \"5m\", not {value!r}")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _PART_RE.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"keep_alive {value!r} is not a duration: use seconds (300), \"5m\", \"1h30m\" or -1 "
                         f"for forever")
    return sign * sum(float(n) * _SECONDS[u] for n, u in parts)
