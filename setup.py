"""Build for xoron: the C extension `xoron._C` and, where nvcc exists, the CUDA plugin.

oneDNN is found, in order, from
  1. XORON_ONEDNN_ROOT (a directory holding include/oneapi/dnnl/dnnl.h and lib/libdnnl.so*),
  2. the `onednn-devel-cpu-gomp` / `onednn-cpu-gomp` wheels in the build environment
     (pyproject.toml asks for them, so a plain `pip install .` finds them).
There is no fallback: without oneDNN the build stops and says how to fix it.

Instruction sets: the extension is built for baseline x86-64; the hot kernels carry
AVX2/FMA (and AVX-512) clones picked at run time, and oneDNN dispatches on its own.
XORON_NATIVE=1 opts in to -march=native for a build that only runs on this CPU.

CUDA: XORON_CUDA=1 forces the plugin on (the build fails without nvcc), XORON_CUDA=0 off;
by default it is built when nvcc is found. It is a separate shared library
(xoron/_xoron_cuda.so, beside `_C` in every kind of build: install, wheel, in place, editable)
that `_C` loads only when a CUDA device is asked for, so the CPU engine imports and runs on
machines without CUDA. `_C` loads only the plugin of its own build (see build_id).

cuBLASLt is loaded by the plugin at run time (no link-time dependency), but its types come from
the toolkit's own cublasLt.h, found, in order, in the include directories of the nvcc used,
under CUDA_HOME / CUDA_PATH, then in an installed `nvidia-cublas-cu12` or `nvidia-cublas`
distribution (torch's CUDA wheels bring one). Without the header the plugin is built with its
built-in GEMM kernels only (xoron.build_info()["cublaslt"] is False).
"""
import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildError(SystemExit):
    pass


def _dist_file(dist_name, suffix):
    """Absolute path of the first file of an installed distribution ending in `suffix`."""
    try:
        from importlib import metadata
        dist = metadata.distribution(dist_name)
    except Exception:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            p = os.path.abspath(str(dist.locate_file(f)))
            if os.path.exists(p):
                return p
    return None


def find_onednn():
    """Returns (include_dir, lib_dir)."""
    root = os.environ.get("XORON_ONEDNN_ROOT")
    if root:
        inc = os.path.join(root, "include")
        libs = glob.glob(os.path.join(root, "lib*", "libdnnl.so*"))
        if not os.path.exists(os.path.join(inc, "oneapi", "dnnl", "dnnl.h")) or not libs:
            raise BuildError(
                f"xoron: XORON_ONEDNN_ROOT={root} holds no include/oneapi/dnnl/dnnl.h "
                "and lib/libdnnl.so; point it at a oneDNN install root.")
        return inc, os.path.dirname(sorted(libs)[0])
    header = _dist_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.h")
    lib = _dist_file("onednn-cpu-gomp", "libdnnl.so") or _dist_file("onednn-cpu-gomp", "libdnnl.so.3")
    if header and lib:
        return os.path.dirname(os.path.dirname(os.path.dirname(header))), os.path.dirname(lib)
    raise BuildError(
        "xoron: oneDNN was not found. Install with `pip install .` (which fetches the "
        "onednn-devel-cpu-gomp wheel as a build requirement), or `pip install "
        "onednn-devel-cpu-gomp==2023.2.0` and build with --no-build-isolation, or set "
        "XORON_ONEDNN_ROOT to a oneDNN install root.")


def find_nvcc():
    mode = os.environ.get("XORON_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return None
    cands = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.insert(0, os.path.join(os.environ[env], "bin", "nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    nvcc = next((c for c in cands if c and os.path.exists(c)), None)
    if nvcc is None and mode in ("1", "on", "yes", "true"):
        raise BuildError("xoron: XORON_CUDA=1 but nvcc was not found (set CUDA_HOME).")
    return nvcc


def _nvcc_include_dirs(nvcc):
    """The include directories nvcc itself passes to its compilers (a wrapper script or a
    symlinked nvcc included), else the toolkit's include beside the nvcc binary."""
    dirs = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ INCLUDES="):
                dirs += [d[2:] for d in line.split("=", 1)[1].replace('"', " ").split() if d.startswith("-I")]
    except (OSError, subprocess.SubprocessError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return dirs + [os.path.join(root, "include"), os.path.join(root, "targets", "x86_64-linux", "include")]


def find_cublaslt_include(nvcc):
    """(the directory holding cublasLt.h, the flags nvcc needs to see it), or (None, []): the
    plugin is then built without cuBLASLt. nvcc's own include directories need no flag."""
    own = _nvcc_include_dirs(nvcc)
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "include"))
    for dist in ("nvidia-cublas-cu12", "nvidia-cublas"):  # torch's CUDA 12 / CUDA 13 wheels
        header = _dist_file(dist, "include/cublasLt.h")
        if header:
            cands.append(os.path.dirname(header))
    for d in own + cands:
        if os.path.isfile(os.path.join(d, "cublasLt.h")):
            return d, ([] if d in own else ["-isystem", d])
    return None, []


PLUGIN = "_xoron_cuda.so"  # beside _C, which loads it (xoron/__init__.py says where)
CUDA_SOURCES = sorted(glob.glob(os.path.join(HERE, "csrc", "backends", "cuda", "*.cu")))
CUBLASLT_SOURCE = os.path.join(HERE, "csrc", "backends", "cuda", "cublaslt.cu")  # only with cublasLt.h
# built with an sm_90a image where 90 is in XORON_CUDA_ARCHS
HOPPER_SOURCES = ("attention_hopper.cu", "grouped_gemm_hopper.cu", "latent_decode_hopper.cu")


def build_id(with_cuda, with_cublaslt):
    """Names this source tree and CUDA choices. _C and the plugin both carry it, and _C loads
    only a plugin with its own id, so a plugin left over from another build is never used."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, HERE).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16] + ("-cuda" if with_cuda else "-cpu") + ("-cublaslt" if with_cublaslt else "")


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class XoronBuildExt(build_ext):
    """Builds _C, then the CUDA plugin beside it, and keeps the plugin where _C goes: an in-place
    or editable build copies it into the source tree like _C, and a build without CUDA removes
    one that an earlier build left there or in build/."""

    def build_extensions(self):
        # setuptools rebuilds _C only when a listed file is newer, not when its defines change.
        stamp = os.path.join(self.build_temp, "xoron_build_id")
        if _read(stamp) != BUILD_ID:
            self.force = True
        # Where _C goes: build/lib* (setuptools >= 65 builds there and copies back for
        # --inplace), or the source tree for older setuptools building in place directly.
        plugin = os.path.join(os.path.dirname(self.get_ext_fullpath("xoron._C")), PLUGIN)
        cuda_jobs = None
        if NVCC:  # nvcc runs while the C sources compile
            sources = [s for s in CUDA_SOURCES if CUBLASLT_INCLUDE or s != CUBLASLT_SOURCE]
            cuda_jobs = self._start_cuda_objects(NVCC, sources)
        elif os.path.exists(plugin):
            os.remove(plugin)
        # _C and _testing compile the same sources to the same object paths, so the extensions
        # are built one after the other (setuptools' -j would build them at once and race), each
        # with its sources compiled in parallel.
        self.parallel = None
        self._compile_sources_in_parallel()
        super().build_extensions()
        if cuda_jobs is not None:
            self._link_cuda_plugin(NVCC, cuda_jobs, plugin)
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(BUILD_ID)

    def _plugin_paths(self):
        """(the plugin in build/lib*, the plugin in the source package) of an in-place build."""
        package_dir = self.get_finalized_command("build_py").get_package_dir("xoron")
        return os.path.join(self.build_lib, "xoron", PLUGIN), os.path.join(package_dir, PLUGIN)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        built, in_source = self._plugin_paths()
        if NVCC:
            self.copy_file(built, in_source, level=self.verbose)
        elif os.path.exists(in_source):
            os.remove(in_source)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace and NVCC:  # an editable install links the plugin as it links _C
            built, in_source = self._plugin_paths()
            mapping[built] = in_source
        return mapping

    def get_outputs(self):
        outputs = super().get_outputs()
        if NVCC and not self.inplace:
            outputs.append(os.path.join(os.path.dirname(self.get_ext_fullpath("xoron._C")), PLUGIN))
        return outputs

    def _compile_sources_in_parallel(self):
        serial_compile = self.compiler.compile

        def compile_each(sources, *args, **kwargs):
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                parts = list(pool.map(lambda src: serial_compile([src], *args, **kwargs), sources))
            return [obj for part in parts for obj in part]
        self.compiler.compile = compile_each

    def _cuda_gencode(self):
        gencode = []
        for a in os.environ.get("XORON_CUDA_ARCHS", "80;90").split(";"):
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        return gencode

    def _start_cuda_objects(self, nvcc, sources):
        """[(nvcc process, object path)] for every CUDA source, all started at once."""
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        jobs = []
        for src in sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            gencode = self._cuda_gencode()
            if os.path.basename(src) in HOPPER_SOURCES and "arch=compute_90,code=sm_90" in gencode:
                # wgmma needs the arch-specific target: its 9.0 image is sm_90a (runs on 9.0 only)
                gencode = [g.replace("compute_90,code=sm_90", "compute_90a,code=sm_90a") for g in gencode]
                gencode.append("-DXO_CUDA_SM90A=1")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC,-Wall,-Wextra",
                   "--expt-relaxed-constexpr", "-I", os.path.join(HERE, "csrc"),
                   f'-DXO_BUILD_ID="{BUILD_ID}"', f"-DXO_CUDA_CUBLASLT={1 if CUBLASLT_INCLUDE else 0}"]
            cmd += gencode + CUBLASLT_FLAGS
            jobs.append((subprocess.Popen(cmd), obj))
        return jobs

    def _link_cuda_plugin(self, nvcc, jobs, out):
        if any(proc.wait() != 0 for proc, _ in jobs):
            raise BuildError("xoron: compiling the CUDA plugin failed (see nvcc's output above). "
                             "Set XORON_CUDA=0 to build the CPU engine alone.")
        cuda_root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        libdirs = [os.path.join(cuda_root, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
        libdirs = [d for d in libdirs if os.path.isdir(d)]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [nvcc, "-shared", "-o", out] + [obj for _, obj in jobs] + [f"-L{d}" for d in libdirs] + \
              ["-lcudart"] + self._cuda_gencode() + \
              [f"-Xlinker=-rpath,{d}" for d in libdirs]
        if subprocess.call(cmd) != 0:
            raise BuildError("xoron: linking the CUDA plugin failed.")


def _c_sources(*folders):
    return sorted(f for d in folders for f in glob.glob(os.path.join("csrc", d, "**", "*.c"), recursive=True))


def make_extensions():
    """xoron._C (the engine and its binding) and xoron._testing (test-only: the kernel-level
    entry points of csrc/testing/ with the engine they drive, reached through ctypes)."""
    import numpy
    dnnl_inc, dnnl_lib = find_onednn()
    cflags = ["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wextra", "-fno-math-errno",
              "-fvisibility=hidden", "-D_GNU_SOURCE"]
    if os.environ.get("XORON_NATIVE") == "1":
        cflags.append("-march=native")
    if os.environ.get("XORON_SANITIZE") == "1":
        cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    ldflags = ["-fopenmp", "-ldl",
               # lib/pythonX.Y/site-packages/xoron/_C.so -> lib/, where the oneDNN wheel
               # puts libdnnl.so.3; plus the build-time location for in-place builds.
               "-Wl,-rpath,$ORIGIN/../../..", f"-Wl,-rpath,{dnnl_lib}"]
    if os.environ.get("XORON_SANITIZE") == "1":
        ldflags.append("-fsanitize=address,undefined")
    common = dict(
        depends=sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
        include_dirs=["csrc", dnnl_inc, numpy.get_include()],
        library_dirs=[dnnl_lib],
        libraries=["dnnl"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("XO_WITH_CUDA", "1" if NVCC else "0"), ("XO_CUDA_CUBLASLT", "1" if CUBLASLT_INCLUDE else "0"),
                       ("XO_BUILD_ID", f'"{BUILD_ID}"')],
    )
    engine = Extension("xoron._C", sources=_c_sources("engine", "backends", "python"), **common)
    hooks = _c_sources("testing")
    if not hooks:  # a source tree without the test entry points builds the engine alone
        return [engine]
    # its own copy of the engine: _C's symbols stay hidden
    return [engine, Extension("xoron._testing", sources=hooks + _c_sources("engine", "backends"), **common)]


try:
    NVCC = find_nvcc() if CUDA_SOURCES else None
    CUBLASLT_INCLUDE, CUBLASLT_FLAGS = find_cublaslt_include(NVCC) if NVCC else (None, [])
    if NVCC and not CUBLASLT_INCLUDE:
        print("xoron: cublasLt.h not found (nvcc's include directories, CUDA_HOME/CUDA_PATH, the "
              "nvidia-cublas-cu12 / nvidia-cublas wheels): the CUDA plugin is built without cuBLASLt, "
              "with its built-in GEMM kernels only", file=sys.stderr)
    BUILD_ID = build_id(NVCC is not None, CUBLASLT_INCLUDE is not None)
    exts = make_extensions()
except BuildError as e:
    sys.stderr.write(str(e) + "\n")
    raise

setup(ext_modules=exts, cmdclass={"build_ext": XoronBuildExt})
