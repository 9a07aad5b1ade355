"""`modelyard chat MODEL`: an interactive streaming REPL over /v1/chat/completions that keeps the
conversation. As `ollama run`: `\"\"\"` starts and ends a multi-line message, `/bye` or Ctrl-D quits, Ctrl-C
stops the reply being written (the connection is closed, which cancels the generation on the server) and at
the prompt clears the line. With stdin not a terminal, the whole of stdin is one message, answered once.

The core (InputCollector, chunk_delta) is pure and table-tested; run_chat is the shell."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from rich.console import Console

from modelyard.console.client import Client
from modelyard.console.errors import ConsoleError, ExitCode
from modelyard.console.loading import load_with_progress, resolve, status_of

BLOCK = '"""'
HELP = ('Type a message and press Enter. """ starts and ends a multi-line message.\n'
        "/clear forgets the conversation, /bye (or Ctrl-D) quits, Ctrl-C stops a reply.")
PROMPT, MORE = ">>> ", "... "


@dataclass(frozen=True)
class Submit:
    text: str


@dataclass(frozen=True)
class Command:
    name: Literal["bye", "clear", "help", "unknown"]
    text: str = ""


@dataclass
class InputCollector:
    """Lines in, messages and commands out; `pending` while a `\"\"\"` block is open."""

    _lines: list[str] = field(default_factory=list)
    pending: bool = False

    def feed(self, line: str) -> Submit | Command | None:
        if self.pending:
            if line.rstrip().endswith(BLOCK):
                self._lines.append(line.rstrip().removesuffix(BLOCK))
                return self._flush()
            self._lines.append(line)
            return None
        stripped = line.strip()
        if stripped.startswith(BLOCK):
            rest = stripped.removeprefix(BLOCK)
            if rest.endswith(BLOCK) and rest:  # """one line"""
                return Submit(rest.removesuffix(BLOCK).strip()) if rest.removesuffix(BLOCK).strip() else None
            self.pending, self._lines = True, [rest] if rest else []
            return None
        if stripped.startswith("/"):
            word = stripped.split()[0]
            known: dict[str, Literal["bye", "clear", "help"]] = {"/bye": "bye", "/exit": "bye", "/clear": "clear",
                                                                  "/?": "help", "/help": "help"}
            return Command(known[word]) if word in known else Command("unknown", word)
        return Submit(stripped) if stripped else None

    def reset(self) -> None:
        self._lines, self.pending = [], False

    def _flush(self) -> Submit | None:
        text = "\n".join(self._lines).strip("\n")
        self.reset()
        return Submit(text) if text.strip() else None


@dataclass(frozen=True)
class Delta:
    text: str = ""
    error: str = ""
    done: bool = False
    finish_reason: str = ""
    usage: Mapping[str, Any] | None = None  # the last chunk's, as stream_options.include_usage asks


def chunk_delta(data: str) -> Delta:
    """One `data:` payload of a /v1/chat/completions stream."""
    if data.strip() == "[DONE]":
        return Delta(done=True)
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Delta(error=f"unreadable chunk: {data[:80]}")
    if not isinstance(chunk, dict):
        return Delta()
    error = chunk.get("error")
    if error:
        return Delta(error=str(error.get("message", error)) if isinstance(error, dict) else str(error))
    choices = chunk.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    content = (choice.get("delta") or {}).get("content") or ""
    usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None
    return Delta(text=str(content), finish_reason=str(choice.get("finish_reason") or ""), usage=usage)


# --- the shell ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    text: str
    finish: str  # stop, length, interrupted, error
    error: str = ""
    usage: Mapping[str, Any] | None = None


def stream_reply(client: Client, model: str, messages: list[dict[str, str]], write: Callable[[str], None],
                 on_first: Callable[[], None], max_tokens: int | None = None) -> Reply:
    """One streamed answer; Ctrl-C stops it and keeps what came so far."""
    parts: list[str] = []
    finish = "stop"
    usage = None
    first = True
    # include_usage: the token counts come back (in --json, and in the server's activity records)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    try:
        with client.events("/v1/chat/completions", body=body) as frames:
            for frame in frames:
                delta = chunk_delta(frame.data)
                if first and (delta.text or delta.done or delta.error):
                    on_first()
                    first = False
                if delta.error:
                    return Reply("".join(parts), "error", delta.error)
                if delta.done:  # read on to the end of the answer: closing now would look like a client gone
                    continue
                if delta.text:
                    parts.append(delta.text)
                    write(delta.text)
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
    except KeyboardInterrupt:
        on_first()
        return Reply("".join(parts), "interrupted")
    finally:
        on_first()
    return Reply("".join(parts), finish, usage=usage)


def _read(prompt: str, show_prompt: bool) -> str:
    return input(prompt if show_prompt else "")


@dataclass(frozen=True)
class ChatSettings:
    as_json: bool = False
    max_tokens: int | None = None  # None: the engine's own limit


def run_chat(client: Client, model: str, out: Console, err: Console, settings: ChatSettings) -> int:
    as_json = settings.as_json
    entry = resolve(client, model)
    name = str(entry["id"])
    interactive = sys.stdin.isatty()
    if status_of(entry) != "loaded":
        try:
            load_with_progress(client, name, err, show=not as_json)
        except ConsoleError as exc:
            if exc.exit_code != ExitCode.REFUSED:  # a key without `admin` cannot load: the request autoloads
                raise
    if not interactive:
        return _answer_once(client, name, sys.stdin.read(), out, err, settings)
    if not as_json:
        err.print(f"[dim]chatting with [bold]{name}[/bold] at {client.conn.url}; /? for help, /bye quits[/dim]")
    return _repl(client, name, out, err, settings)


def _answer_once(client: Client, name: str, text: str, out: Console, err: Console, settings: ChatSettings) -> int:
    if not text.strip():
        raise ConsoleError("nothing to send: stdin was empty", ExitCode.USAGE)
    reply = _turn(client, name, [{"role": "user", "content": text.strip()}], out, err, settings)
    if reply.finish == "error":
        raise ConsoleError(reply.error, ExitCode.SERVER)
    return int(ExitCode.OK)


def _repl(client: Client, name: str, out: Console, err: Console, settings: ChatSettings) -> int:
    as_json = settings.as_json
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    history: list[dict[str, str]] = []
    collector = InputCollector()
    while True:
        try:
            line = _read(MORE if collector.pending else PROMPT, show_prompt=not as_json)
        except EOFError:
            if not as_json:
                out.print()
            return int(ExitCode.OK)
        except KeyboardInterrupt:
            collector.reset()
            err.print("\nUse Ctrl + d or /bye to exit.")
            continue
        action = collector.feed(line)
        if isinstance(action, Command):
            if action.name == "bye":
                return int(ExitCode.OK)
            if action.name == "clear":
                history.clear()
                err.print("Cleared the conversation.")
            elif action.name == "help":
                err.print(HELP, highlight=False, markup=False)
            else:
                err.print(f"Unknown command '{action.text}'. Type /? for help", highlight=False, markup=False)
            continue
        if action is None:
            continue
        messages = [*history, {"role": "user", "content": action.text}]
        try:
            reply = _turn(client, name, messages, out, err, settings)
        except ConsoleError as exc:  # the REPL stays up: the server may come back, the model may load later
            err.print(f"[red]Error:[/red] {exc.format_message()}", highlight=False)
            continue
        if reply.finish == "error":
            err.print(f"[red]Error:[/red] {reply.error}", highlight=False)
            continue
        if reply.text:  # an interrupted reply stays in the conversation as far as it was shown
            history += [messages[-1], {"role": "assistant", "content": reply.text}]


def _turn(client: Client, name: str, messages: list[dict[str, str]], out: Console, err: Console,
          settings: ChatSettings) -> Reply:
    as_json = settings.as_json
    status = err.status("waiting for the model...", spinner="dots") if not as_json else None
    if status is not None:
        status.start()

    def first() -> None:
        if status is not None:
            status.stop()

    def write(text: str) -> None:
        if not as_json:
            out.file.write(text)
            out.file.flush()

    reply = stream_reply(client, name, messages, write, first, settings.max_tokens)
    if as_json:
        out.file.write(orjson.dumps(_reply_json(name, reply)).decode() + "\n")
        out.file.flush()
    else:
        out.file.write("\n" if reply.text and not reply.text.endswith("\n") else "")
        if reply.finish == "interrupted":
            err.print("[dim](stopped)[/dim]")
        out.file.write("\n")
        out.file.flush()
    return reply


def _reply_json(name: str, reply: Reply) -> dict[str, Any]:
    return {"model": name, "role": "assistant", "content": reply.text, "finish_reason": reply.finish,
            "error": reply.error or None, "usage": reply.usage}
