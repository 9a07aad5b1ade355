"""End to end tests of the reliability features of issue 9 (points 2, 4 and 5) with `modelyard serve` as a
subprocess, the real llama-server and the real demo models (the fake engine only where a load or a stream must
last a known time): children reachable only through modelyard, wedged children and load timeouts, and the
graceful drain on SIGTERM (with SIGHUP's reload and an exit that no background GGUF parse can delay).

tests/test_shell.py tests the same shell in-process with fake children; these check that the real processes
behave as the fakes say. Waits are bounded polls on observable conditions (a status in /models, a process
exiting), never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Router, direct_client, fake_cmd

SMOL = "smol"
CHAT = {"messages": [{"role": "user", "content": "Tell me a very long story about trains."}], "temperature": 0}
EVIL = "https://evil.example"


def _until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy (and return it), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def _entry(router: Router, model: str) -> dict[str, Any]:
    data = router.client.get("/models").json()["data"]
    return next(dict(m) for m in data if m["id"] == model)


def _environ(pid: int) -> dict[str, str]:
    pairs = (item.partition(b"=") for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line[len("data: "):] for line in lines if line.startswith("data: "))


def _exit_code(router: Router, timeout: float) -> int:
    try:
        return router.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"modelyard did not exit within {timeout} s:\n{router.log()[-3000:]}") from None


def _fake_preset(tmp_path: Path, extra: str = "") -> Path:
    preset = tmp_path / "fake.ini"
    preset.write_text(f"[fake]\ncmd = {fake_cmd('fake')}\n{extra}")
    return preset


# -- 1. children reachable only through modelyard --

def test_a_child_answers_only_modelyard(models_dir: Path, start_router: Any) -> None:
    router_key = "router-key-e2e-0123456789"
    router: Router = start_router("--models-dir", str(models_dir), env={"LLAMA_API_KEY": router_key})
    router.client.headers["Authorization"] = f"Bearer {router_key}"
    body = {"model": SMOL, **CHAT, "max_tokens": 4}
    # Through modelyard, with the client's own key in either header: answered (the child would 401 that key).
    assert router.client.post("/v1/chat/completions", json=body).status_code == 200
    with_x_key = httpx.post(router.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": router_key},
                            timeout=60)
    assert with_x_key.status_code == 200, with_x_key.text
    assert httpx.post(router.url + "/v1/chat/completions", json=body, timeout=60).status_code == 401

    pid = router.child_pid(SMOL)
    child = direct_client(router.endpoint(SMOL), timeout=60)
    direct = {k: v for k, v in body.items() if k != "model"}
    # Straight to the child (on its socket, which modelyard's user can reach): no key, or modelyard's own
    # key, is refused.
    assert child.post("/v1/chat/completions", json=direct).status_code == 401
    as_client = child.post("/v1/chat/completions", json=direct, headers={"Authorization": f"Bearer {router_key}"})
    assert as_client.status_code == 401

    # Its key is in its environment only (any local user can read argv), and is not the router's.
    child_key = _environ(pid)["LLAMA_API_KEY"]
    assert child_key and child_key != router_key
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert child_key.encode() not in argv and router_key.encode() not in argv
    assert b"--api-key" not in argv

    # Even with its key, the child never tells a foreign page it may read the answer.
    keyed = {"Authorization": f"Bearer {child_key}", "Origin": EVIL}
    answered = child.post("/v1/chat/completions", json=direct, headers=keyed)
    assert answered.status_code == 200
    assert answered.headers.get("Access-Control-Allow-Origin", "").endswith(".invalid")  # no page has it
    preflight = child.options("/v1/chat/completions", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("Access-Control-Allow-Origin", "").endswith(".invalid")
    child.close()


# -- 2. wedged children and load timeouts --

def test_a_stopped_child_ends_its_requests_and_is_loaded_again_a_working_one_is_not_stopped(
        models_dir: Path, start_router: Any) -> None:
    # 1 s: each of the three STOPs below is caught within a few seconds (the wait dominated this test at 4 s,
    # and 11 s at 2 s); the long silent generation first shows that 1 s takes no working child for a stall.
    router: Router = start_router("--models-dir", str(models_dir), "--stall-timeout", "1")
    long = {"model": SMOL, **CHAT, "max_tokens": 4000, "ignore_eos": True}
    assert router.client.post("/v1/chat/completions", json={**long, "max_tokens": 2}).status_code == 200

    # First, a child that is working is no stall: a non-streamed answer sends nothing until it ends, and
    # llama-server's /slots counters show it is working (400 tokens take 3 to 16 s here; probes every 0.5 s;
    # 200 took only 1.45 s once one child had a core of its own).
    started = time.monotonic()
    reply = router.client.post("/v1/chat/completions", json={**long, "max_tokens": 400})
    took = time.monotonic() - started
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 400
    assert took > 1.5, f"{took:.1f} s is too short to show anything with a 1 s stall-timeout"
    assert router.status(SMOL) == "loaded"

    # A stream in flight when the child is STOPped ends with an error event and [DONE].
    pid = router.child_pid(SMOL)
    with router.client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as response:
        assert response.status_code == 200
        events = _data_lines(response.iter_lines())
        for _ in range(3):
            next(events)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        rest = list(events)
    took = time.monotonic() - stopped_at
    assert took < 30, f"the stream ended {took:.1f} s after the child was stopped"
    assert rest[-1] == "[DONE]", rest[-3:]
    error = json.loads(rest[-2])["error"]
    assert "failed mid-stream" in error["message"]
    router.wait_status(SMOL, "failed", timeout=10)
    failure = _entry(router, SMOL)["status"]["failure"]
    assert "stall-timeout" in failure or "health checks" in failure, failure
    _until(lambda: not _alive(pid), 10, f"the stopped child {pid} is killed")

    # The next request loads it again.
    again = router.client.post("/v1/chat/completions", json={**long, "max_tokens": 2})
    assert again.status_code == 200, again.text
    second = router.child_pid(SMOL)
    assert second != pid

    # A non-streamed request in flight on a STOPped child gets a 502 (it has no answer headers yet).
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(router.client.post, "/v1/chat/completions", json=long, timeout=60)
        _until(lambda: any(s["is_processing"] for s in router.client.get(f"/slots?model={SMOL}").json()), 30,
               "the long request is being generated")
        os.kill(second, signal.SIGSTOP)
        stopped_at = time.monotonic()
        reply = pending.result(timeout=40)
    assert time.monotonic() - stopped_at < 30
    assert reply.status_code == 502, reply.text
    message = reply.json()["error"]["message"]
    assert "was killed" in message and ("stall-timeout" in message or "health checks" in message), message
    _until(lambda: not _alive(second), 10, f"the stopped child {second} is killed")

    # Ollama's stream ends with its own error line.
    ollama = {"model": SMOL, "messages": CHAT["messages"], "options": {"num_predict": 4000}}
    with router.client.stream("POST", "/api/chat", json=ollama) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        third = router.child_pid(SMOL)
        os.kill(third, signal.SIGSTOP)
        tail = [json.loads(line) for line in lines if line]
    assert "failed mid-stream" in tail[-1]["error"], tail[-1]
    _until(lambda: not _alive(third), 10, f"the stopped child {third} is killed")


def test_requests_racing_a_child_s_death_get_502_or_503_never_500(models_dir: Path, start_router: Any) -> None:
    """Was 500 `Session is closed` for 3 in ~5,000 requests over 3 kills. A 502 names the child's death, not
    the reset its connection saw first (the full bench's soak showed "Connection reset by peer")."""
    router: Router = start_router("--models-dir", str(models_dir))
    body = {"model": SMOL, "content": "hello world"}
    assert router.client.post("/tokenize", json=body).status_code == 200
    statuses: list[int] = []
    failures: list[str] = []
    done = False

    def hammer() -> None:
        with httpx.Client(base_url=router.url, timeout=60) as http:
            while not done:
                reply = http.post("/tokenize", json=body)
                statuses.append(reply.status_code)
                if reply.status_code == 502:
                    failures.append(reply.json()["error"]["message"])

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(hammer) for _ in range(4)]
        try:
            for _ in range(3):
                router.wait_status(SMOL, "loaded")
                target = len(statuses) + 20
                _until(lambda: len(statuses) > target, 30, "requests are being answered")  # noqa: B023
                os.kill(router.child_pid(SMOL), signal.SIGKILL)
                _until(lambda: router.status(SMOL) != "loaded", 10, "the death is noticed")
        finally:
            done = True
        for worker in workers:
            worker.result(timeout=60)
    unexpected = sorted({code for code in statuses if code not in (200, 502, 503)})
    assert not unexpected, f"{unexpected} among {len(statuses)} answers:\n{router.log()[-3000:]}"
    assert statuses.count(200) > 60
    assert all("exited: llama-server was killed by a signal" in message for message in failures), failures


def test_a_child_that_answers_health_but_stalls_its_requests_is_killed(tmp_path: Path, start_router: Any) -> None:
    """llama.cpp users report children that answer /health but stall every inference: the fake engine does
    exactly that with a long fake_delay (headers at once for a stream, then nothing)."""
    router: Router = start_router("--models-preset", str(_fake_preset(tmp_path)), "--stall-timeout", "1")
    stalled = {"model": "fake", **CHAT, "fake_delay": 120, "fake_chunks": 2}
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(router.client.post, "/v1/chat/completions", json=stalled, timeout=60)
        started = time.monotonic()
        with router.client.stream("POST", "/v1/chat/completions", json={**stalled, "stream": True}) as response:
            assert response.status_code == 200
            events = list(_data_lines(response.iter_lines()))
        reply = plain.result(timeout=60)
    assert time.monotonic() - started < 20
    assert events[-1] == "[DONE]" and "stall-timeout 1 s" in json.loads(events[-2])["error"]["message"], events
    assert reply.status_code == 502 and "stall-timeout 1 s" in reply.json()["error"]["message"], reply.text
    router.wait_status("fake", "failed", timeout=10)
    assert router.client.post("/v1/chat/completions", json={"model": "fake", **CHAT}).status_code == 200


def test_a_long_prompt_step_is_not_taken_for_a_stall(tmp_path: Path, demo_models: dict[str, Path],
                                                    start_router: Any) -> None:
    preset = tmp_path / "big-batch.ini"
    preset.write_text(f"[big-batch]\nmodel = {demo_models['smollm2-135m-instruct']}\nctx-size = 8192\n"
                      "batch-size = 8192\nubatch-size = 8192\nparallel = 1\n")
    router: Router = start_router("--models-preset", str(preset), "--stall-timeout", "1")
    body = {"model": "big-batch", "max_tokens": 2}
    warm = {**body, "messages": [{"role": "user", "content": "hi"}]}
    assert router.client.post("/v1/chat/completions", json=warm).status_code == 200
    # About 900 prompt tokens in one step: 2 to 6 s on this machine (2,300 took 5 to 13 s), with /slots
    # unanswered meanwhile; a 1 s stall-timeout probes every 0.5 s.
    prompt = " ".join(f"word{i}" for i in range(250))
    reply = router.client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user",
                                                                                   "content": prompt}]})
    assert reply.status_code == 200, reply.text


def test_a_load_past_its_load_timeout_is_killed_and_its_waiters_told(tmp_path: Path, start_router: Any) -> None:
    preset = tmp_path / "slow.ini"
    preset.write_text(f"[slow]\ncmd = {fake_cmd('slow', load_delay=60)}\nload-timeout = 2\n")
    router: Router = start_router("--models-preset", str(preset))
    started = time.monotonic()
    reply = router.client.post("/v1/chat/completions", json={"model": "slow", **CHAT})
    assert time.monotonic() - started < 10
    assert reply.status_code == 502, reply.text
    assert "load-timeout" in reply.json()["error"]["message"], reply.text
    _until(lambda: not router.children(), 10, "the slow child is gone")
    assert router.status("slow") == "failed"


# -- 3. graceful drain --

def test_sigterm_lets_a_stream_finish_and_refuses_new_requests(models_dir: Path, start_router: Any) -> None:
    # A generous grace: on this shared 2-core machine smol streams 12 to 100 tokens/s, and the point is that
    # the stream finishes, not how fast.
    router: Router = start_router("--models-dir", str(models_dir), "--shutdown-grace", "120")
    body = {"model": SMOL, **CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = _data_lines(response.iter_lines())
        next(events)
        router.proc.send_signal(signal.SIGTERM)
        health = _until(lambda: (r := router.client.get("/health")).status_code == 503 and r, 10,
                        "/health says draining")
        assert health.json() == {"status": "draining"}
        refused = router.client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert float(refused.headers["Retry-After"]) > 0
        assert router.client.get("/models").status_code == 200
        assert router.proc.poll() is None, "modelyard exited with a stream in flight"
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert not any('"error"' in line for line in rest), [line for line in rest if '"error"' in line]
    assert len(rest) > 50  # the tokens after the first (60 asked for) came through
    assert _exit_code(router, 20) == 0
    assert router.children() == []


def test_a_stream_outlasting_the_shutdown_grace_ends_with_an_error(tmp_path: Path, start_router: Any) -> None:
    router: Router = start_router("--models-preset", str(_fake_preset(tmp_path)), "--shutdown-grace", "1")
    body = {"model": "fake", "stream": True, "fake_delay": 30, "fake_chunks": 30, **CHAT}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = _data_lines(response.iter_lines())
        next(events)
        signalled = time.monotonic()
        router.proc.send_signal(signal.SIGTERM)
        rest = list(events)
    assert time.monotonic() - signalled < 10
    assert rest[-1] == "[DONE]"
    assert "shutdown-grace" in json.loads(rest[-2])["error"]["message"], rest[-2]
    assert _exit_code(router, 10) == 0
    assert router.children() == []


def test_a_second_sigterm_cuts_the_grace_short(tmp_path: Path, start_router: Any) -> None:
    router: Router = start_router("--models-preset", str(_fake_preset(tmp_path)))  # grace: 30 s
    body = {"model": "fake", "stream": True, "fake_delay": 30, "fake_chunks": 30, **CHAT}
    with router.client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = _data_lines(response.iter_lines())
        next(events)
        router.proc.send_signal(signal.SIGTERM)
        _until(lambda: router.client.get("/health").status_code == 503, 10, "/health says draining")
        signalled = time.monotonic()
        router.proc.send_signal(signal.SIGTERM)
        rest = list(events)
        assert _exit_code(router, 10) == 0
    assert time.monotonic() - signalled < 10  # not the 30 s grace, nor the stream's 30 s
    assert rest[-1] == "[DONE]" and "error" in json.loads(rest[-2])
    assert router.children() == []


def test_sighup_rereads_the_models_dir(models_dir: Path, start_router: Any) -> None:
    router: Router = start_router("--models-dir", str(models_dir))
    (models_dir / "smol-c.gguf").symlink_to((models_dir / "smol.gguf").resolve())
    router.proc.send_signal(signal.SIGHUP)
    _until(lambda: "smol-c" in {m["id"] for m in router.client.get("/models").json()["data"]}, 10,
           "the new model is listed after SIGHUP")
    assert router.proc.poll() is None


def test_a_gguf_parse_in_progress_does_not_delay_exit(tmp_path: Path, demo_models: dict[str, Path],
                                                     start_router: Any) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / SMOL).with_suffix(".gguf").symlink_to(demo_models["smollm2-135m-instruct"])
    big = models / "big.gguf"
    with big.open("wb") as file:
        # A GGUF header that promises 10**9 metadata entries, then 300 MB of zeros (sparse): each reads as an
        # empty key with a one-byte value, so the parse walks the whole file (~8 CPU-seconds on main).
        file.write(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (10**9).to_bytes(8, "little"))
        file.truncate(300 << 20)
    router: Router = start_router("--models-dir", str(models))

    def background_workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                if f"\nPPid:\t{router.proc.pid}\n" in status and b"modelyard.background" in (
                        entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    workers = _until(background_workers, 10, "the background worker is reading the files")
    # Past a CPU-second it is inside big.gguf's parse (smol's facts take well under one; digests come last).
    _until(lambda: _cpu_seconds(workers[0]) > 1.0, 30, "the worker is parsing big.gguf")
    signalled = time.monotonic()
    router.proc.send_signal(signal.SIGTERM)
    assert _exit_code(router, 10) == 0
    took = time.monotonic() - signalled
    assert took < 3, f"exit took {took:.1f} s"
    _until(lambda: not any(_alive(pid) for pid in workers), 5, "the background worker is gone")
