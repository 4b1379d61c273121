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


# OpenMP threads that wait for work spin before they sleep. libgomp's default spin (300000
# rounds of PAUSE, milliseconds on recent Intel cores) lets a waiting thread hold a core that
# another process needs. Too short a spin costs the other way: the gaps between a decode step's
# parallel regions outlast it, so every region pays a futex wake-up (a third of the speed on an
# idle machine). 10000 rounds cover those gaps and still let a thread sleep well within a step
# once work runs out. libgomp reads the variable only when it loads (with _C), so it is set for
# that moment, and only when the user has chosen neither it nor OMP_WAIT_POLICY
# (benchmarks/RESULTS.md, "Spin bound").
_SPIN_ENV = "GOMP_SPINCOUNT"
_SPIN_DEFAULT = "10000"


def _import_with_short_spin():
    if "OMP_WAIT_POLICY" in _os.environ or _SPIN_ENV in _os.environ:
        return _import_extension()
    _os.environ[_SPIN_ENV] = _SPIN_DEFAULT
    try:
        return _import_extension()
    finally:  # children and other OpenMP runtimes keep their own defaults
        del _os.environ[_SPIN_ENV]


_C = _import_with_short_spin()

_cuda_plugin = _os.path.join(_os.path.dirname(_os.path.abspath(_C.__file__)), "_xoron_cuda.so")
_C.set_cuda_plugin(_cuda_plugin)

from .config import LlamaConfig  # noqa: E402
from .modeling import CausalLMOutput, KVCache  # noqa: E402
from .streaming import TextStreamer  # noqa: E402

__all__ = ["MoELlamaForCausalLM", "LlamaConfig", "CausalLMOutput", "KVCache", "TextStreamer", "load_tokenizer",
           "cuda_available", "build_info", "option_names", "option_table", "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"


def __getattr__(name):
    """MoELlamaForCausalLM is the torch.nn.Module form (xoron.torch_module) when torch can be
    imported, else the numpy class (xoron.modeling); decided on first use, so that importing
    xoron alone never imports torch."""
    if name != "MoELlamaForCausalLM":
        raise AttributeError(f"module 'xoron' has no attribute {name!r}")
    try:
        from .torch_module import MoELlamaForCausalLM as cls
    except ImportError as e:
        if e.name != "torch":
            raise
        from .modeling import MoELlamaForCausalLM as cls
    globals()["MoELlamaForCausalLM"] = cls
    return cls


def load_tokenizer(path):
    """Reads a HuggingFace tokenizer.json (byte-level BPE) without extra dependencies."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


def cuda_available() -> bool:
    """True when device="cuda" can work here: this build has its CUDA plugin, and the plugin's
    CUDA runtime finds a driver and at least one GPU."""
    return _C.cuda_device_count() > 0


def build_info():
    """What this build was compiled with: {"cuda": the CUDA plugin was built (nvcc was found),
    "cublaslt": the plugin has its cuBLASLt path (setup.py found cublasLt.h; without it every
    GPU product takes the built-in kernels), "build_id": the id _C and its plugin share}."""
    return _C.build_info()


def option_table():
    """[(name, environment variable, values, meaning)] of every option a model takes
    (`MoELlamaForCausalLM(..., options={name: value})`); the variable sets the default."""
    return _C.option_table()


def option_names():
    """The names of the options a model takes (see option_table)."""
    return [row[0] for row in _C.option_table()]


def set_num_threads(n: int) -> None:
    """Sets the number of CPU threads of every model that has no count of its own (1..4096).
    The default is the physical cores this process may run on (its CPU affinity), or
    OMP_NUM_THREADS when that is set."""
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """The CPU thread count models use unless given their own (see set_num_threads)."""
    return _C.get_num_threads()
