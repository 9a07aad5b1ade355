"""modelyard's default flags for llama-server children (engine/defaults.py): added only where unset."""

from __future__ import annotations

import pytest

from modelyard.engine.defaults import child_defaults


@pytest.mark.parametrize(("settings", "gpus", "added"), [
    ({"--ctx-size": "2048"}, False, {"--warmup": "false", "--fit": "off"}),
    ({}, False, {"--warmup": "false"}),  # llama-server sizes the context itself: fit decides it
    ({"--ctx-size": "0"}, False, {"--warmup": "false"}),  # 0 = from the model, as unset
    ({"--ctx-size": "many"}, False, {"--warmup": "false"}),
    ({"--ctx-size": "2048"}, True, {"--warmup": "false"}),  # on a GPU fit chooses the offloaded layers
    ({"--ctx-size": "2048", "--warmup": "true"}, False, {"--fit": "off"}),  # the preset's warm-up wins
    ({"--ctx-size": "2048", "--fit": "on"}, False, {"--warmup": "false"}),  # and so does its fit
])
def test_defaults_are_added_only_where_unset(settings: dict[str, str], gpus: bool, added: dict[str, str]) -> None:
    assert child_defaults(settings, gpus) == {**settings, **added}
