"""setup.py does what it says: the CUDA plugin lands beside _C in every kind of build, and a
build without CUDA never ships a plugin that an earlier build left behind.

Each test builds a copy of setup.py around a one-file stand-in for csrc/ (so a build takes a
second, not a minute); the plugin logic under test is setup.py's own."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "_xoron_cuda.so"

STAND_IN_MODULE = r"""
#include <Python.h>
static struct PyModuleDef def = { PyModuleDef_HEAD_INIT, "xoron._C", NULL, -1, NULL, NULL, NULL, NULL, NULL };
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&def); }
"""
STAND_IN_KERNEL = "__global__ void xo_stand_in(float *x) { x[threadIdx.x] += 1.0f; }\n"

def _onednn_for_builds():
    """setup.py's own lookup: XORON_ONEDNN_ROOT, or the onednn-devel-cpu-gomp distribution (pip
    install . takes it only into its isolated build environment)."""
    if os.environ.get("XORON_ONEDNN_ROOT"):
        return True
    try:
        from importlib import metadata
        metadata.distribution("onednn-devel-cpu-gomp")
        return True
    except Exception:
        return False


needs_setup = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, "setup.py")) or not _onednn_for_builds(),
    reason="needs the source tree (setup.py) and oneDNN's headers (onednn-devel-cpu-gomp or XORON_ONEDNN_ROOT)")


def _tree(tmp_path, with_kernel=False):
    """A source tree: the real setup.py and pyproject.toml, a stand-in csrc/, the package dirs."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "csrc" / "python").mkdir(parents=True)
    (tmp_path / "csrc" / "python" / "module.c").write_text(STAND_IN_MODULE)
    if with_kernel:
        (tmp_path / "csrc" / "backends" / "cuda").mkdir(parents=True)
        (tmp_path / "csrc" / "backends" / "cuda" / "kernel.cu").write_text(STAND_IN_KERNEL)
    for package in ("xoron", "xoron/demo", "xoron/tokenizer"):  # pyproject.toml's packages
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    return tmp_path


def _setup(tree, *args, cuda="0"):
    env = dict(os.environ, XORON_CUDA=cuda, XORON_CUDA_ARCHS=os.environ.get("XORON_CUDA_ARCHS", "90"))
    r = subprocess.run([sys.executable, "setup.py", *args], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _stale(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"a plugin from an earlier build")


@needs_setup
def test_cpu_inplace_build_removes_stale_plugins(tmp_path):
    tree = _tree(tmp_path, with_kernel=True)
    in_build, in_source = tree / "b" / "lib" / "xoron" / PLUGIN, tree / "xoron" / PLUGIN
    _stale(in_build)
    _stale(in_source)
    _setup(tree, "build_ext", "--inplace", "-b", "b/lib", "-t", "b/tmp")
    assert glob.glob(str(tree / "xoron" / "_C.*"))
    assert not in_source.exists() and not in_build.exists()


@needs_setup
def test_cpu_build_ships_no_stale_plugin(tmp_path):
    """What a wheel holds is build/lib*: a plugin left there or in the source package stays out."""
    tree = _tree(tmp_path, with_kernel=True)
    _stale(tree / "b" / "lib" / "xoron" / PLUGIN)
    _stale(tree / "xoron" / PLUGIN)
    _setup(tree, "build", "--build-base", "b", "--build-lib", "b/lib")
    assert glob.glob(str(tree / "b" / "lib" / "xoron" / "_C.*"))
    assert not glob.glob(str(tree / "b" / "**" / PLUGIN), recursive=True)


@needs_setup
@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_cuda_inplace_build_puts_the_plugin_beside_C(tmp_path):
    tree = _tree(tmp_path, with_kernel=True)
    _setup(tree, "build_ext", "--inplace", "-b", "b/lib", "-t", "b/tmp", cuda="1")
    assert glob.glob(str(tree / "xoron" / "_C.*")) and (tree / "xoron" / PLUGIN).exists()
    assert (tree / "b" / "lib" / "xoron" / PLUGIN).exists()
    # then a CPU-only rebuild of the same tree takes it away again
    _setup(tree, "build_ext", "--inplace", "-b", "b/lib", "-t", "b/tmp")
    assert not (tree / "xoron" / PLUGIN).exists() and not (tree / "b" / "lib" / "xoron" / PLUGIN).exists()


@needs_setup
@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_editable_build_puts_the_plugin_beside_C(tmp_path):
    """`pip install -e .` builds through editable_wheel, which builds the extensions in place."""
    tree = _tree(tmp_path, with_kernel=True)
    _setup(tree, "editable_wheel", "--dist-dir", "dist", cuda="1")
    assert glob.glob(str(tree / "xoron" / "_C.*")) and (tree / "xoron" / PLUGIN).exists()
