"""Whether device="cuda" can work is asked of the CUDA plugin of this very build and its
runtime, never guessed from a file being there; when it cannot, the error says why plainly.

Stand-in plugins (a few lines of C, built here) play the plugin's part, so every answer is
checked on any machine, with or without a GPU."""
import ctypes
import os
import shutil
import subprocess

import pytest

import xoron
from xoron import _C

TINY = {"vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "kv_lora_rank": 8}
CUDA_BUILD = xoron.build_info()["cuda"]
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _driver_installed() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _stand_in(tmp_path, build_id: str, devices: int, why: str = "") -> str:
    src = tmp_path / "plugin.c"
    src.write_text(f"""
#include <stdio.h>
const char *xo_cuda_plugin_build_id(void) {{ return "{build_id}"; }}
int xo_cuda_plugin_device_count(char *why, size_t len) {{
    if ({devices} <= 0) snprintf(why, len, "%s", "{why}");
    return {devices};
}}
""")
    out = str(tmp_path / "_xoron_cuda.so")
    subprocess.run([CC, "-shared", "-fPIC", "-o", out, str(src)], check=True, capture_output=True)
    return out


@pytest.fixture
def plugin_at():
    """Points _C at another plugin for one test, then back at the real one."""
    yield _C.set_cuda_plugin
    _C.set_cuda_plugin(xoron._cuda_plugin)


def _cuda_error() -> str:
    with pytest.raises(RuntimeError) as e:
        xoron.MoELlamaForCausalLM(TINY, device="cuda", seed=0)
    return str(e.value)


def test_cuda_available_is_the_plugin_device_count():
    count = _C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    assert xoron.cuda_available() == (count > 0)


@pytest.mark.skipif(_driver_installed(), reason="this machine has a CUDA driver")
def test_no_driver_means_no_cuda():
    assert _C.cuda_device_count() == 0 and not xoron.cuda_available()
    msg = _cuda_error()
    if CUDA_BUILD:
        assert "no CUDA GPU/driver found" in msg and "libcuda.so.1" in msg, msg
    else:
        assert "built without CUDA support" in msg, msg
    assert "insufficient" not in msg  # the runtime's word for "no driver" misleads


needs_cc = pytest.mark.skipif(CC is None, reason="needs a C compiler for the stand-in plugins")


@needs_cc
def test_a_plugin_of_another_build_is_never_loaded(tmp_path, plugin_at):
    plugin_at(_stand_in(tmp_path, "0123456789abcdef-cuda", devices=1))
    assert _C.cuda_device_count() == 0 and not xoron.cuda_available()
    msg = _cuda_error()
    assert ("left by another build" in msg) if CUDA_BUILD else ("built without CUDA support" in msg), msg


@needs_cc
def test_the_device_count_comes_from_the_plugin(tmp_path, plugin_at):
    plugin_at(_stand_in(tmp_path, _C.build_id, devices=2))
    if CUDA_BUILD:
        assert _C.cuda_device_count() == 2 and xoron.cuda_available()
        assert "lacks xo_cuda_plugin_create" in _cuda_error()
    else:  # a CPU-only build loads no plugin, not even one carrying its id
        assert _C.cuda_device_count() == 0 and not xoron.cuda_available()
        assert "built without CUDA support" in _cuda_error()


@needs_cc
def test_no_visible_gpu_says_so(tmp_path, plugin_at):
    plugin_at(_stand_in(tmp_path, _C.build_id, devices=0, why="no CUDA device is visible"))
    assert _C.cuda_device_count() == 0 and not xoron.cuda_available()
    msg = _cuda_error()
    if not CUDA_BUILD:
        assert "built without CUDA support" in msg, msg
    elif _driver_installed():
        assert "no CUDA GPU/driver found (no CUDA device is visible)" in msg, msg
    else:
        assert "no CUDA GPU/driver found" in msg and "libcuda.so.1" in msg, msg


def test_a_missing_plugin_says_so(tmp_path, plugin_at):
    plugin_at(str(tmp_path / "nowhere" / "_xoron_cuda.so"))
    assert _C.cuda_device_count() == 0 and not xoron.cuda_available()
    msg = _cuda_error()
    assert ("CUDA plugin" in msg and "is missing" in msg) if CUDA_BUILD else ("built without CUDA support" in msg)
