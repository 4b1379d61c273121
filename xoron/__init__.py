"""xoron: a fast C/CUDA inference engine for the Xoron MoE-LLaMA language model."""
import ctypes as _ctypes
import glob as _glob
import os as _os
import sys as _sys


def _preload_onednn():
    """Make libdnnl.so.3 (installed by the onednn-cpu-gomp wheel under <prefix>/lib) loadable
    even where the extension's rpath does not reach it (user installs, odd layouts)."""
    import site
    roots = [_sys.prefix, _sys.exec_prefix, getattr(site, "USER_BASE", None), _os.environ.get("XORON_ONEDNN_ROOT")]
    here = _os.path.dirname(_os.path.abspath(__file__))
    roots.append(_os.path.abspath(_os.path.join(here, "..", "..", "..", "..")))
    for root in roots:
        if not root:
            continue
        for lib in sorted(_glob.glob(_os.path.join(root, "lib*", "libdnnl.so.3*"))):
            try:
                _ctypes.CDLL(lib, mode=_ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _use_installed_build():
    """Run from a source checkout (the repository root first on sys.path), this package
    shadows the installed one and has no compiled modules: take them from the installed copy."""
    here = _os.path.realpath(_os.path.dirname(__file__))
    for entry in _sys.path:
        cand = _os.path.join(entry or ".", "xoron")
        if _os.path.realpath(cand) != here and _glob.glob(_os.path.join(cand, "_C.*")):
            __path__.append(cand)  # noqa: F821  (the package's own search path)
            return True
    return False


def _import_extension():
    try:
        from . import _C
        return _C
    except ImportError as e:
        if "libdnnl" in str(e):  # libdnnl not found through the rpath: look for it and retry once
            _preload_onednn()
        elif not _use_installed_build():
            raise ImportError("xoron's C extension is not built: install with `pip install .`, or build in "
                              "place with `python setup.py build_ext --inplace`") from e
    from . import _C
    return _C


_C = _import_extension()

_cuda_plugin = _os.path.join(_os.path.dirname(_os.path.abspath(_C.__file__)), "_xoron_cuda.so")
_C.set_cuda_plugin(_cuda_plugin)

from .config import LlamaConfig  # noqa: E402
from .modeling import CausalLMOutput, KVCache, MoELlamaForCausalLM  # noqa: E402
from .streaming import TextStreamer  # noqa: E402

__all__ = ["MoELlamaForCausalLM", "LlamaConfig", "CausalLMOutput", "KVCache", "TextStreamer", "load_tokenizer",
           "cuda_available", "option_names", "option_table"]
__version__ = "0.1.0"


def load_tokenizer(path):
    """Reads a HuggingFace tokenizer.json (byte-level BPE) without extra dependencies."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


def cuda_available() -> bool:
    """True when device="cuda" can work here: this build has its CUDA plugin, and the plugin's
    CUDA runtime finds a driver and at least one GPU."""
    return _C.cuda_device_count() > 0


def option_table():
    """[(name, environment variable, values, meaning)] of every option a model takes
    (`MoELlamaForCausalLM(..., options={name: value})`); the variable sets the default."""
    return _C.option_table()


def option_names():
    """The names of the options a model takes (see option_table)."""
    return [row[0] for row in _C.option_table()]
