"""Hugging Face models in the catalog: the cache's GGUF repos listed as router mode lists them (`org/repo:QUANT`,
source `cache`), presets with `hf-repo` / `hf-file` / `hf-token` as llama-server takes them, started with
`-m` on the cached file (the child never downloads) and the token never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelyard.config.catalog import Sources, build_catalog
from modelyard.config.options import OptionTable, parse_help
from modelyard.config.presets import ConfigError
from modelyard.engine.command import Engine, launch_plan
from modelyard.hub.refs import HubRef
from tests.fake_hub import COMMIT

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"


@pytest.fixture(scope="module")
def table() -> OptionTable:
    return OptionTable(parse_help(HELP.read_text()))


def cache_with(cache: Path, repo: str, *paths: str) -> Path:
    """Files in the layout huggingface_hub and llama.cpp write (blobs, snapshot links, refs/main)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    for number, path in enumerate(paths):
        blob = folder / "blobs" / f"{number:064x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"GGUF")
        link = folder / "snapshots" / COMMIT / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return folder / "snapshots" / COMMIT


def test_cached_repos_are_listed_as_router_mode_lists_them(tmp_path: Path, table: OptionTable) -> None:
    snapshot = cache_with(tmp_path / "hub", "org/vis-GGUF", "vis-Q4_K_M.gguf", "vis-Q8_0.gguf", "mmproj-vis-F16.gguf")
    preset = tmp_path / "models.ini"
    preset.write_text("[*]\nctx-size = 1024\n\n[org/vis-GGUF:q8_0]\nalias = vis\n")
    catalog = build_catalog(Sources(table, preset_path=preset, hub_cache=tmp_path / "hub"))
    assert sorted(catalog.models) == ["org/vis-GGUF:Q4_K_M", "org/vis-GGUF:Q8_0"]
    cached = catalog.models["org/vis-GGUF:Q4_K_M"]
    assert cached.source == "cache" and cached.hub is not None and cached.hub.ref == HubRef("org/vis-GGUF", "Q4_K_M")
    assert cached.model_path == str(snapshot / "vis-Q4_K_M.gguf")
    assert cached.settings["--mmproj"] == str(snapshot / "mmproj-vis-F16.gguf")
    assert cached.settings["--ctx-size"] == "1024" and "--hf-repo" not in cached.settings
    merged = catalog.models["org/vis-GGUF:Q8_0"]  # a preset section named like a cache entry extends it
    assert merged.source == "preset" and merged.aliases == ("vis",) and merged.model_path is not None


def test_a_preset_with_hf_repo_starts_its_child_on_the_cached_file(tmp_path: Path, table: OptionTable,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = cache_with(tmp_path / "hub", "org/chat-GGUF", "chat-Q4_K_M.gguf", "sub/chat-F16.gguf",
                          "mmproj-chat-F16.gguf")
    preset = tmp_path / "models.ini"
    preset.write_text("[chat]\nhf-repo = org/chat-GGUF\nhf-token = hf_very_secret\n\n"
                      "[exact]\nhf = org/chat-GGUF:Q8_0\nhff = sub/chat-F16.gguf\nno-mmproj = true\n\n"
                      "[missing]\nLLAMA_ARG_HF_REPO = org/other-GGUF:Q4_0\n")
    catalog = build_catalog(Sources(table, preset_path=preset))
    chat = catalog.models["chat"]
    assert chat.model_path == str(snapshot / "chat-Q4_K_M.gguf")  # Q4_K_M by default
    assert chat.hub is not None and chat.hub.token is not None and chat.hub.token.value == "hf_very_secret"
    assert f"hf-token in [chat] ({preset}:3)" == chat.hub.token.source
    assert "hf_very_secret" not in chat.preset_text and "hf-token = (hidden)" in chat.preset_text
    argv = launch_plan(chat, Engine(Path("/bin/llama-server"), table), 9999).argv
    assert argv[argv.index("--model") + 1] == chat.model_path and "--mmproj" in argv
    assert not [a for a in argv if a.startswith("--hf") or "secret" in a]  # the child never downloads
    exact = catalog.models["exact"]
    assert exact.model_path == str(snapshot / "sub/chat-F16.gguf")  # hf-file overrides the quant
    assert "--mmproj" not in exact.settings and exact.hub is not None and not exact.hub.mmproj
    missing = catalog.models["missing"]
    assert missing.model_path is None and missing.needs_download and not chat.needs_download


def test_dedup_cache_models_hides_the_cache_entry_of_a_presets_file(tmp_path: Path, table: OptionTable,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_with(tmp_path / "hub", "org/chat-GGUF", "chat-Q4_K_M.gguf", "chat-Q8_0.gguf")
    preset = tmp_path / "models.ini"
    preset.write_text("[chat]\nhf-repo = org/chat-GGUF:Q4_K_M\ndedup-cache-models = true\n")
    catalog = build_catalog(Sources(table, preset_path=preset, hub_cache=tmp_path / "hub"))
    assert sorted(catalog.models) == ["chat", "org/chat-GGUF:Q8_0"]  # as router mode: Q4_K_M is chat's


@pytest.mark.parametrize(("ini", "says"), [
    ("[x]\nhf-repo = just-a-name\n", r"models.ini:2 \[x\]: hf-repo: 'just-a-name' is not a Hugging Face model"),
    ("[x]\nhf-repo = org/repo:Q4:Q8\n", "more than one ':'"),
])
def test_a_bad_hf_repo_stops_the_start_with_file_and_line(tmp_path: Path, table: OptionTable, ini: str,
                                                          says: str) -> None:
    preset = tmp_path / "models.ini"
    preset.write_text(ini)
    with pytest.raises(ConfigError, match=says):
        build_catalog(Sources(table, preset_path=preset, hub_cache=tmp_path / "hub"))
