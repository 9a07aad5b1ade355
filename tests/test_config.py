"""Presets and models-dir scanning, checked against llama-server b11434's real option table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelyard.config.catalog import Sources, build_catalog
from modelyard.config.options import OptionTable, load_option_table, parse_help
from modelyard.config.presets import ConfigError, canonical_section_name
from modelyard.engine.command import Engine, launch_plan, render_settings

HELP = Path(__file__).parent / "data" / "llama-server-b11434-help.txt"


@pytest.fixture(scope="module")
def table() -> OptionTable:
    return OptionTable(parse_help(HELP.read_text()))


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def catalog(tmp_path: Path, table: OptionTable, ini: str, **kwargs: object):  # type: ignore[no-untyped-def]
    preset = tmp_path / "models.ini"
    preset.write_text(ini)
    return build_catalog(Sources(table, preset_path=preset, **kwargs))  # type: ignore[arg-type]


def _help_printer(path: Path, runs: Path) -> Path:
    """A stand-in binary that prints the real --help and counts its runs."""
    path.write_text(f"#!/bin/sh\necho run >> {runs}\ncat {HELP}\n")
    path.chmod(0o755)
    return path


def test_the_option_table_is_read_once_per_binary_version_and_gone_binaries_leave_the_cache(tmp_path: Path) -> None:
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    first, second = _help_printer(tmp_path / "a-server", runs), _help_printer(tmp_path / "b-server", runs)
    for _ in range(2):
        assert load_option_table(first, cache_dir).lookup("ctx-size") is not None
    assert runs.read_text().count("run") == 1  # the second came from the cache
    os.utime(first, ns=(1, 1))  # a rebuilt binary: read again
    load_option_table(first, cache_dir)
    assert runs.read_text().count("run") == 2
    first.unlink()
    load_option_table(second, cache_dir)
    cached = json.loads((cache_dir / "engine-options.json").read_text())
    assert [key.split("|")[1] for key in cached] == [str(second.resolve())]  # one file, a's entry dropped
    assert sorted(p.name for p in cache_dir.iterdir()) == ["engine-options.json", "engine-options.json.lock"]


def test_option_table_knows_long_short_env_and_negations(table: OptionTable) -> None:
    for key in ("ctx-size", "c", "LLAMA_ARG_CTX_SIZE", "--ctx-size"):
        option = table.lookup(key)
        assert option is not None and option.canonical == "--ctx-size" and option.takes_value
    jinja = table.lookup("no-jinja")
    assert jinja is not None and jinja.canonical == "--jinja" and table.is_negation("no-jinja")
    assert table.lookup("no-kvu") is table.lookup("kv-unified")
    for positive, negations in (("kv-offload", ("-nkvo", "--no-kv-offload")), ("repack", ("-nr", "--no-repack")),
                                ("cont-batching", ("-nocb", "--no-cont-batching"))):
        option = table.lookup(positive)
        assert option is not None and option.canonical == f"--{positive}" and option.negations == negations
        assert all(table.is_negation(n) for n in negations)
    assert table.lookup("load-on-startup") is not None  # preset-only keys
    assert table.lookup("not-a-flag") is None


def test_preset_keys_in_all_three_forms_with_global_section(tmp_path: Path, table: OptionTable, gguf: Path) -> None:
    result = catalog(tmp_path, table, f"""
version = 1
; a comment
[*]
c = 2048
jinja = true

[chat]  # trailing comment
model = {gguf}
LLAMA_ARG_N_GPU_LAYERS = 0
ctx-size = 4096 ; overrides [*]
no-jinja = true
alias = talk, chatty
load-on-startup = true
stop-timeout = 3
""")
    assert list(result.models) == ["chat"]  # no phantom `default` model from `version`
    chat = result.models["chat"]
    assert chat.settings == {"--ctx-size": "4096", "--jinja": "false", "--n-gpu-layers": "0", "--model": str(gguf)}
    assert chat.aliases == ("talk", "chatty")
    assert chat.load_on_startup and chat.stop_timeout == 3
    assert result.resolve("chatty") is chat
    rendered = render_settings(chat.settings, table)
    assert "--no-jinja" in rendered and "--jinja" not in rendered
    assert rendered[rendered.index("--ctx-size") + 1] == "4096"
    assert rendered[rendered.index("--model") + 1] == str(gguf)


def test_router_command_line_beats_section_beats_global(tmp_path: Path, table: OptionTable, gguf: Path) -> None:
    result = catalog(tmp_path, table, f"[*]\nc = 1\nthreads = 1\n[m]\nmodel = {gguf}\nc = 2\n",
                     router_settings={"--ctx-size": "3"})
    assert result.models["m"].settings["--ctx-size"] == "3"
    assert result.models["m"].settings["--threads"] == "1"


def test_models_dir_layout(tmp_path: Path, table: OptionTable) -> None:
    models = tmp_path / "models"
    (models / "vision").mkdir(parents=True)
    (models / "big").mkdir()
    for name in ("top.gguf", "mmproj-top.gguf", "mtp-draft.gguf", "notes.txt", "vision/model-q4.gguf",
                 "vision/mmproj-f16.gguf", "big/big-00001-of-00002.gguf", "big/big-00002-of-00002.gguf"):
        (models / name).write_bytes(b"GGUF")
    result = build_catalog(Sources(table, models_dir=models))
    assert sorted(result.models) == ["big", "top", "vision"]
    assert result.models["vision"].settings["--mmproj"].endswith("mmproj-f16.gguf")
    assert result.models["big"].model_path is not None
    assert result.models["big"].model_path.endswith("big-00001-of-00002.gguf")


def test_preset_section_extends_models_dir_entry(tmp_path: Path, table: OptionTable) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "top.gguf").write_bytes(b"GGUF")
    result = catalog(tmp_path, table, "[top]\nc = 512\n", models_dir=models)
    assert result.models["top"].settings["--ctx-size"] == "512"
    assert result.models["top"].source == "preset"


@pytest.mark.parametrize(("ini", "message"), [
    ("[m]\nmodel = {gguf}\nbogus-key = 1\n", r"models.ini:3: option 'bogus-key' not recognized in preset \[m\]"),
    ("[m]\nc = 512\n", r"models.ini:1 \[m\]: model 'm' has no model source"),
    ("[m]\nmodel = /nonexistent/x.gguf\n", r"models.ini:2 \[m\]: model file '/nonexistent/x.gguf' does not exist"),
    ("[a]\nmodel = {gguf}\nalias = x\n[b]\nmodel = {gguf}\nalias = x\n", r"name 'x' is already used by .*\[a\]"),
    ("[a]\nmodel = {gguf}\n[a]\nmodel = {gguf}\n", r"models.ini:3: section \[a\] is defined twice"),
    ("[a]\nmodel = {gguf}\njinja = maybe\n", r"models.ini:3: option 'jinja' in preset \[a\] is a boolean"),
    ("[a]\nthis line is wrong\n", r"models.ini:2: cannot parse 'this line is wrong'"),
])
def test_bad_presets_name_file_line_and_section(tmp_path: Path, table: OptionTable, gguf: Path, ini: str,
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        catalog(tmp_path, table, ini.format(gguf=gguf))


@pytest.mark.parametrize(("lines", "expected"), [
    ("", {"replicas": 1, "pinned": False, "priority": 0, "concurrency_limit": 0}),
    ("replicas = 3", {"replicas": 3}),
    ("replicas = 1\npriority = -2", {"replicas": 1, "priority": -2}),
    ("pin = on\nconcurrency-limit = 4", {"pinned": True, "concurrency_limit": 4}),
    ("keep-alive = 5m\nload-timeout = -1", {"keep_alive": 300.0, "load_timeout": 0.0}),
])
def test_modelyards_own_preset_keys(tmp_path: Path, table: OptionTable, gguf: Path, lines: str,
                                    expected: dict[str, object]) -> None:
    model = catalog(tmp_path, table, f"[m]\nmodel = {gguf}\n{lines}\n").models["m"]
    assert {field: getattr(model, field) for field in expected} == expected
    assert model.settings == {"--model": str(gguf)}  # never passed to the child


def test_replicas_in_the_global_section_apply_to_every_model(tmp_path: Path, table: OptionTable, gguf: Path) -> None:
    result = catalog(tmp_path, table, f"[*]\nreplicas = 2\n[a]\nmodel = {gguf}\n[b]\nmodel = {gguf}\nreplicas = 1\n")
    assert {name: m.replicas for name, m in result.models.items()} == {"a": 2, "b": 1}


@pytest.mark.parametrize(("line", "message"), [
    ("replicas = 0", r"models.ini:3 \[m\]: replicas = '0': must be 1 or more"),
    ("replicas = -1", r"models.ini:3 \[m\]: replicas = '-1': must be 1 or more"),
    ("replicas = two", r"models.ini:3 \[m\]: replicas = 'two': expected a whole number"),
    ("replicas = 1.5", r"models.ini:3 \[m\]: replicas = '1.5': expected a whole number"),
    ("priority = high", r"models.ini:3 \[m\]: priority = 'high': expected a whole number"),
    ("concurrency-limit = -1", r"models.ini:3 \[m\]: concurrency-limit = '-1': must be 0 \(no limit\) or more"),
    ("pin = maybe", r"models.ini:3 \[m\]: pin = 'maybe': expected true or false"),
])
def test_bad_values_of_modelyards_own_keys_name_the_section_and_key(tmp_path: Path, table: OptionTable, gguf: Path,
                                                                    line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        catalog(tmp_path, table, f"[m]\nmodel = {gguf}\n{line}\n")


def test_missing_preset_file_and_models_dir(tmp_path: Path, table: OptionTable) -> None:
    with pytest.raises(ConfigError, match="preset file does not exist"):
        build_catalog(Sources(table, preset_path=tmp_path / "nope.ini"))
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        build_catalog(Sources(table, models_dir=tmp_path / "nope"))


def test_tagged_section_names_are_canonical() -> None:
    assert canonical_section_name("repo:q4_k_m") == "repo:Q4_K_M"
    assert canonical_section_name("repo:model-q8_0") == "repo:Q8_0"
    assert canonical_section_name("*") == "*"


def test_request_names_are_never_paths(tmp_path: Path, table: OptionTable, gguf: Path) -> None:
    result = catalog(tmp_path, table, f"[m]\nmodel = {gguf}\n")
    assert result.resolve(str(gguf)) is None
    assert result.resolve("../m") is None


def test_launch_plan_forces_loopback_port_and_alias(tmp_path: Path, table: OptionTable, gguf: Path) -> None:
    result = catalog(tmp_path, table, f"[m]\nmodel = {gguf}\nhost = 0.0.0.0\nport = 1\n")
    plan = launch_plan(result.models["m"], Engine(Path("/bin/llama-server"), table, router_port=8080), 5555)
    argv = list(plan.argv)
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv.count("--host") == 1
    assert argv[argv.index("--port") + 1] == "5555" and argv.count("--port") == 1
    assert argv[argv.index("--alias") + 1] == "m"
    assert plan.env["LLAMA_SERVER_ROUTER_PORT"] == "8080"


@pytest.mark.parametrize(("argv", "engine_args", "verbose"), [
    # click clusters short options: `-lv` was read as `-l -v`, modelyard's -v taken out and `-l 2` left for the
    # child (`--logit-bias 2`: every load crash-looped)
    (["-lv", "2"], ("-lv", "2"), False),
    (["-kvu", "-dev", "none", "-v"], ("-kvu", "-dev", "none"), True),
    (["-ngl", "99", "-c", "2048", "--temp", "-1"], ("-ngl", "99", "-c", "2048", "--temp", "-1"), False),
    (["-v", "-np", "4"], ("-np", "4"), True),
])
def test_serve_passes_llama_server_s_multi_letter_short_options_whole(
        argv: list[str], engine_args: tuple[str, ...], verbose: bool) -> None:
    from modelyard.cli import serve
    params = serve.make_context("serve", [*argv, "--port", "0"]).params
    assert params["engine_args"] == engine_args and params["verbose"] is verbose and params["port"] == 0
