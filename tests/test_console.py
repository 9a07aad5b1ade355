"""The console commands against a real `modelyard serve` (the real engine, the demo models, one server for the
module, with scoped keys): what each command prints and exits with, and `chat` and `top` driven in a
pseudo-terminal (pexpect), synchronised on what they print."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pexpect
import pytest
from click.testing import CliRunner, Result

from modelyard.cli import main
from tests.conftest import Router, fake_cmd, free_port

ADMIN, READER = "admin-key-for-tests", "read-key-for-tests"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Iterator[Router]:
    directory = tmp_path_factory.mktemp("console")
    preset = directory / "models.ini"
    preset.write_text(f"[*]\nc = 2048\n[smol]\nmodel = {demo_models['smollm2-135m-instruct']}\nalias = s\n"
                      f"[gemma]\nmodel = {demo_models['gemma3-270m']}\n"
                      f"[broken]\ncmd = {fake_cmd('broken', fail=True)}\n")
    keys = directory / "keys.toml"
    keys.write_text(f'[[key]]\nname = "ops"\nkey = "{ADMIN}"\nscopes = ["admin"]\n'
                    f'[[key]]\nname = "viewer"\nkey = "{READER}"\nscopes = ["read"]\n')
    started = Router(["--models-preset", str(preset), "--api-key-file", str(keys)], directory)
    started.client.headers["Authorization"] = f"Bearer {ADMIN}"
    yield started.wait_ready()
    started.stop()


def run(router: Router, *args: str, key: str | None = ADMIN, stdin: str | None = None) -> Result:
    env = {"MODELYARD_URL": router.url, "MODELYARD_API_KEY": key or "", "MODELYARD_API_KEY_FILE": ""}
    return CliRunner().invoke(main, list(args), env=env, input=stdin, catch_exceptions=False)


def json_of(result: Result) -> Any:
    return orjson.loads(result.stdout)


def test_ls_lists_every_model(router: Router) -> None:
    result = run(router, "ls", "--json")
    assert result.exit_code == 0, result.output
    assert {m["name"]: m["status"] for m in json_of(result)} == {"smol": "unloaded", "gemma": "unloaded",
                                                                  "broken": "unloaded"}
    table = run(router, "ls").stdout
    assert "NAME" in table and "broken" in table and " s " in table.split("smol", 1)[1].splitlines()[0]


def test_load_ps_unload(router: Router) -> None:
    result = run(router, "load", "s")  # an alias
    assert result.exit_code == 0, result.output
    assert "smol loaded in" in result.stdout
    assert router.status("smol") == "loaded"
    (row,) = json_of(run(router, "ps", "--json"))
    assert (row["name"], row["status"], row["context"], row["processor"]) == ("smol", "loaded", 2048, "100% CPU")
    assert row["size"] > 50_000_000
    table = run(router, "ps").stdout
    assert "smol" in table and "100% CPU" in table and "Forever" in table and "gemma" not in table
    again = run(router, "load", "smol", "--json")  # already loaded: done at once
    assert again.exit_code == 0 and json_of(again)["status"] == "loaded"
    result = run(router, "unload", "smol")
    assert result.exit_code == 0 and "unloading smol" in result.stdout
    router.wait_status("smol", "unloaded", timeout=20)
    assert json_of(run(router, "ps", "--json")) == []


def test_a_failed_load_exits_1_with_the_reason(router: Router) -> None:
    result = run(router, "load", "broken")
    assert result.exit_code == 1
    assert "'broken' failed to load" in result.stderr and "asked to fail" in result.stderr
    result = run(router, "load", "broken", "--json")
    assert result.exit_code == 1 and json_of(result)["status"] == "failed"


@pytest.mark.parametrize("args", [("load", "nope"), ("unload", "nope"), ("logs", "nope"), ("chat", "nope")])
def test_an_unknown_model_exits_4(router: Router, args: tuple[str, ...]) -> None:
    result = run(router, *args)
    assert result.exit_code == 4 and result.stderr == "Error: model 'nope' not found\n"


@pytest.mark.parametrize(("key", "args", "code", "words"), [
    (None, ("ps",), 5, "needs an API key: pass --api-key-file FILE or set $MODELYARD_API_KEY"),
    ("wrong", ("ls",), 5, "refused the API key from $MODELYARD_API_KEY"),
    (READER, ("load", "smol"), 5, "lacks the 'admin' scope needed for POST /models/load"),
    (READER, ("unload", "--all"), 5, "lacks the 'admin' scope"),
    (READER, ("ps",), 0, "NAME"),
    (ADMIN, ("unload",), 2, "give a MODEL or --all"),
    (ADMIN, ("ps", "--url", "localhost:8080"), 2, "must start with http://"),
])
def test_keys_scopes_and_usage(router: Router, key: str | None, args: tuple[str, ...], code: int,
                               words: str) -> None:
    result = run(router, *args, key=key)
    assert result.exit_code == code
    assert words in (result.stderr if code else result.stdout)
    assert READER not in result.output and ADMIN not in result.output


def test_the_key_file_is_read(router: Router, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"# the reader's key\n{READER}\n")
    assert run(router, "ps", "--api-key-file", str(key_file), key=None).exit_code == 0


def test_no_server_is_one_line_and_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "modelyard.cli", "ps", "--url", url], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.startswith(f"Error: cannot reach modelyard at {url}: ")
    assert proc.stderr.endswith("(is `modelyard serve` running?)\n") and proc.stderr.count("\n") == 1


def spawn(router: Router, *args: str) -> pexpect.spawn:
    env = {**os.environ, "MODELYARD_URL": router.url, "MODELYARD_API_KEY": ADMIN, "TERM": "xterm"}
    return pexpect.spawn(sys.executable, ["-m", "modelyard.cli", *args], env=env, encoding="utf-8", timeout=60,
                         dimensions=(50, 160))


def in_flight(router: Router) -> list[dict[str, Any]]:
    return list(router.client.get("/activity", params={"model": "smol"}).json()["in_flight"])


def chat_records(router: Router) -> list[dict[str, Any]]:
    return [r for r in router.client.get("/activity", params={"model": "smol"}).json()["data"]
            if r["route"] == "/v1/chat/completions"]


def test_chat_repl_in_a_terminal(router: Router) -> None:
    assert router.status("smol") == "unloaded"  # as test_load_ps_unload left it
    before = len(chat_records(router))
    chat = spawn(router, "chat", "smol", "--max-tokens", "4")
    try:
        chat.expect_exact("loading smol")  # the load's progress, while the model loads
        chat.expect_exact(">>> ")
        chat.sendline('"""Name a colour.')
        chat.expect_exact("... ")
        chat.sendline('One word only."""')
        chat.expect_exact(">>> ")
        chat.sendline("/nope")
        chat.expect_exact("Unknown command '/nope'")
        chat.expect_exact(">>> ")
        chat.sendline("And another?")  # shorter than the first message: its prompt is longer only with history
        chat.expect_exact(">>> ")
        chat.sendintr()  # at the prompt: a hint, not an exit
        chat.expect_exact("Use Ctrl + d or /bye to exit.")
        chat.sendline("/bye")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0
    records = chat_records(router)
    first, second = sorted(records[: len(records) - before], key=lambda r: r["id"])
    assert second["tokens_in"] > first["tokens_in"] + 5


def test_chat_ctrl_c_stops_the_reply_and_ctrl_d_quits(router: Router) -> None:
    chat = spawn(router, "chat", "smol")
    try:
        chat.expect_exact(">>> ")
        chat.sendline("Write a very long story about a train, in at least 2000 words.")
        deadline = time.monotonic() + 30
        while not in_flight(router):
            assert time.monotonic() < deadline, "the long reply never started"
            time.sleep(0.05)
        chat.sendintr()
        chat.expect_exact("(stopped)")
        chat.expect_exact(">>> ")
        deadline = time.monotonic() + 10
        while in_flight(router):
            assert time.monotonic() < deadline, "Ctrl-C did not end the generation on the server"
            time.sleep(0.05)
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_chat_answers_stdin_once_and_top_json(router: Router) -> None:
    result = run(router, "chat", "smol", "--json", "--max-tokens", "4", stdin="Reply with one word: hello")
    assert result.exit_code == 0, result.output
    reply = json_of(result)
    assert reply["model"] == "smol" and reply["content"] and reply["finish_reason"] in ("stop", "length")
    assert reply["usage"]["prompt_tokens"] > 5 and reply["usage"]["completion_tokens"] > 0
    snapshot = json_of(run(router, "top", "--json"))
    assert {m["id"] for m in snapshot["models"]} == {"smol", "gemma", "broken"}
    assert snapshot["in_flight"] == []
    latest = snapshot["recent"][0]  # the chat read its answer to the end: a clean 200 with its token counts
    assert (latest["route"], latest["status"], latest["error"]) == ("/v1/chat/completions", 200, None)
    assert latest["tokens_out"] == reply["usage"]["completion_tokens"]


def test_top_in_a_terminal(router: Router) -> None:
    top = spawn(router, "top")
    stop = threading.Event()

    def generate() -> None:  # a request in flight for top to show, ended once it has been seen
        with httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as client:
            # ignore_eos: a reply that ended early could start and end within one of top's ticks, never drawn
            body = {"model": "smol", "stream": True, "max_tokens": 2000, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Count from 1 to 1000."}]}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        return

    worker = threading.Thread(target=generate, daemon=True)
    try:
        top.expect_exact("modelyard top")
        top.expect_exact("broken")
        worker.start()
        top.expect_exact("In flight: 1")
        stop.set()
        top.expect_exact("In flight: 0")
        top.send("q")
        top.expect(pexpect.EOF)
    finally:
        stop.set()
        top.close(force=True)
        worker.join(timeout=10)
    assert top.exitstatus == 0


def test_logs_of_a_model(router: Router) -> None:
    result = run(router, "logs", "broken", "--json")  # the engine's own words, from the earlier failed loads
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert any("asked to fail" in line["line"] for line in lines) and all(line["time"] > 0 for line in lines)
    one = run(router, "logs", "smol", "-n", "1")
    assert one.exit_code == 0 and len(one.stdout.splitlines()) == 1


def test_logs_follow_prints_new_lines(router: Router) -> None:
    logs = spawn(router, "logs", "-f", "-n", "1", "broken")
    try:
        logs.expect_exact("asked to fail")  # the last line so far
        router.client.post("/models/load", json={"model": "broken"})
        logs.expect_exact("asked to fail")  # the new failure's, from /logs/sse
        logs.sendintr()
        logs.expect(pexpect.EOF)
    finally:
        logs.close(force=True)
    assert logs.exitstatus == 0


def test_unload_all(router: Router) -> None:
    assert router.status("smol") == "loaded"
    result = run(router, "unload", "--all", "--json")
    assert result.exit_code == 0 and "smol" in json_of(result)["unloaded"]
    router.wait_status("smol", "unloaded", timeout=20)
    assert run(router, "unload", "--all").stdout.startswith("unloading nothing")
