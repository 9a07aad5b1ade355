"""Keep-alive durations, parsed as leniently as clients send them: 300, "300", "5m", "1h30m", "-1", "-1m".

This is the one parser behind the request field `keep_alive`, the `--keep-alive`/`--max-wait` flags and the
preset `keep-alive` key, so it alone decides what is representable. A fault campaign found `1e20`, `3e11`,
`"inf"` and `"nan"` accepted: every `GET /api/ps` then answered 500 (datetime overflow computing expires_at),
`/models` emitted `Infinity`/`NaN` (not JSON), and `"nan"` made the idle router wake ~850 times a second (every
comparison with NaN is false, so the expiry timer was always due). So non-finite values are refused, and so is
anything longer than MAX_SECONDS.
"""

from __future__ import annotations

import math
import re

_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# Ten years. Longer is not a keep-alive but "forever", which is -1. It must stay representable wherever a
# duration flows: now + it as a datetime (/api/ps expires_at; year 9999 is about 7,970 years away), the event
# loop's call_later (uvloop keeps milliseconds in 64 bits) and JSON numbers.
MAX_SECONDS = 10 * 365 * 24 * 3600.0
FOREVER = -1.0


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _forms(name: str) -> str:
    return (f"{name} must be seconds (300), a duration like \"5m\" or \"1h30m\" (units ns, us, ms, s, m, h), or "
            f"a negative value (-1) for forever, at most {MAX_SECONDS:.0f} seconds (10 years)")


def parse_duration(value: object, name: str = "keep_alive") -> float:
    """Seconds in [0, MAX_SECONDS], or FOREVER (-1.0) for any negative value. Raises ValueError with a message
    that names `name`, the accepted forms and the range."""
    seconds = _seconds(value, name)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} {_shown(value)} is not a finite duration; {_forms(name)}")
    if seconds < 0:
        return FOREVER
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} {_shown(value)} is too long; {_forms(name)}")
    return seconds


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} {_shown(value)} is not a duration; {_forms(name)}")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int beyond any float (10**400)
            return math.inf if value > 0 else -math.inf
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _PART_RE.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"{name} {_shown(value)} is not a duration; {_forms(name)}")
    return sign * sum(float(n) * _SECONDS[u] for n, u in parts)
