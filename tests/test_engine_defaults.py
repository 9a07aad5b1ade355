"""modelyard's default flags for llama-server children (engine/defaults.py): added only where neither the settings
nor the environment the child inherits set them, and `--fit off` only where the child can use no GPU; and which
binary is modelyard's own CPU build (engine/install.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelyard.config.options import EngineOption, OptionTable
from modelyard.engine.defaults import child_defaults
from modelyard.engine.install import build_key, is_cpu_build

# as llama-server b11434 lists them: --warmup has no variable of its own
TABLE = OptionTable([EngineOption(("--warmup",), ("--no-warmup",)),
                     EngineOption(("-fit", "--fit"), env=("LLAMA_ARG_FIT",), takes_value=True),
                     EngineOption(("-c", "--ctx-size"), env=("LLAMA_ARG_CTX_SIZE",), takes_value=True),
                     EngineOption(("-ngl", "--gpu-layers", "--n-gpu-layers"), env=("LLAMA_ARG_N_GPU_LAYERS",),
                                  takes_value=True),
                     EngineOption(("-dev", "--device"), env=("LLAMA_ARG_DEVICE",), takes_value=True)])
# a build that names a variable for the warm-up too
WARMUP_ENV = OptionTable([EngineOption(("--warmup",), ("--no-warmup",), env=("LLAMA_ARG_WARMUP",))])
NO_WARMUP = {"--warmup": "false"}
BOTH = {"--warmup": "false", "--fit": "off"}
CTX = {"--ctx-size": "2048"}


@pytest.mark.parametrize(("settings", "environ", "cpu_build", "added"), [
    pytest.param(CTX, {}, True, BOTH, id="cpu-build-context-set"),
    pytest.param({}, {}, True, NO_WARMUP, id="no-context-fit-sizes-it"),
    pytest.param({"--ctx-size": "0"}, {}, True, NO_WARMUP, id="context-0-is-unset"),
    pytest.param({"--ctx-size": "many"}, {}, True, NO_WARMUP, id="context-not-a-number"),
    pytest.param({}, {"LLAMA_ARG_CTX_SIZE": "2048"}, True, BOTH, id="context-from-the-environment"),
    # another binary may offload (Metal, ROCm, Vulkan, CUDA without nvidia-smi): fit chooses the layers
    pytest.param(CTX, {}, False, NO_WARMUP, id="other-binary-may-use-a-gpu"),
    pytest.param({**CTX, "--n-gpu-layers": "0"}, {}, False, BOTH, id="other-binary-no-layer-offloaded"),
    pytest.param(CTX, {"LLAMA_ARG_N_GPU_LAYERS": "0"}, False, BOTH, id="no-layer-offloaded-by-the-environment"),
    pytest.param({**CTX, "--n-gpu-layers": "auto"}, {}, False, NO_WARMUP, id="layers-auto"),
    pytest.param({**CTX, "--n-gpu-layers": "12"}, {"LLAMA_ARG_N_GPU_LAYERS": "0"}, False, NO_WARMUP,
                 id="the-setting-over-the-environment"),
    pytest.param({**CTX, "--device": "none"}, {}, False, BOTH, id="device-none"),
    pytest.param(CTX, {"LLAMA_ARG_DEVICE": "None"}, False, BOTH, id="device-none-by-the-environment"),
    pytest.param({**CTX, "--device": "Vulkan0"}, {}, False, NO_WARMUP, id="a-device-named"),
    # explicit settings win: the preset's, the command line's, or the inherited variable's
    pytest.param({**CTX, "--warmup": "true"}, {}, True, {"--fit": "off"}, id="the-presets-warmup-wins"),
    pytest.param({**CTX, "--fit": "on"}, {}, True, NO_WARMUP, id="the-presets-fit-wins"),
    pytest.param(CTX, {"LLAMA_ARG_FIT": "on"}, True, NO_WARMUP, id="the-environments-fit-wins"),
])
def test_defaults_are_added_only_where_unset(settings: dict[str, str], environ: dict[str, str], cpu_build: bool,
                                             added: dict[str, str]) -> None:
    assert child_defaults(settings, environ, TABLE, cpu_build) == {**settings, **added}


def test_the_warm_up_variable_is_the_one_the_option_table_names() -> None:
    assert child_defaults({}, {"LLAMA_ARG_WARMUP": "1"}, WARMUP_ENV, True) == {}
    assert child_defaults({}, {"LLAMA_ARG_WARMUP": "1"}, TABLE, True) == NO_WARMUP  # b11434 reads no such thing


@pytest.mark.parametrize(("cmake_args", "platform", "cpu"), [
    pytest.param("", "linux", True, id="own-default-build"),
    pytest.param("-DGGML_CUDA=ON", "linux", False, id="own-build-with-cmake-args"),
    pytest.param("", "darwin", False, id="own-default-build-has-metal-on-macos"),
])
def test_which_binary_is_modelyards_own_cpu_build(cmake_args: str, platform: str, cpu: bool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "platform", platform)
    binary = tmp_path / build_key(cmake_args) / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.touch()
    assert is_cpu_build(binary) is cpu
    elsewhere = tmp_path / "elsewhere" / "llama-server"  # the PATH's, --llama-server's: unknown backends
    assert not is_cpu_build(elsewhere)
