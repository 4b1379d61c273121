"""Model options (engine/options.c): one table of names, values and environment variables,
parsed strictly, per model, through the constructor and from_pretrained."""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import TINY_RING, small_config  # noqa: E402

import xoron  # noqa: E402


def model(**kw):
    return xoron.MoELlamaForCausalLM(small_config(), seed=1, **kw)


def test_every_option_has_a_variable_values_and_a_meaning():
    table = xoron.option_table()
    assert [r[0] for r in table] == xoron.option_names()
    assert {"threads", "cpu_isa", "cpu_gemv_max_rows", "cpu_tile_rows", "prefill_chunk", "cuda_moe", "cuda_attention",
            "cuda_attention_keys", "cuda_gemm", "cublaslt_library", "cuda_pdl", "cuda_graphs", "cuda_memory_limit"} == set(xoron.option_names())
    for name, env, values, doc in table:
        assert env.startswith("XORON_") and values and doc, name
    assert len({r[1] for r in table}) == len(table)


def test_unknown_option_lists_the_valid_ones():
    valid = r"\(valid options: threads, .*cuda_attention, .*cuda_memory_limit\)"
    with pytest.raises(ValueError, match=r"unknown option 'cuda_atten' " + valid):
        model(options={"cuda_atten": "rows"})


@pytest.mark.parametrize("name, value, expected", [
    ("cuda_moe", "gpu", r"option cuda_moe: 'gpu' is not valid \(expected device, host\)"),
    ("cuda_attention", "wmma", r"expected auto, rows, latent_decode, mma"),
    ("cuda_gemm", "v1", r"expected cublaslt, builtin"),
    ("cpu_isa", "sse", r"expected auto, generic, avx2, avx512"),
    ("threads", -1, r"option threads: '-1' is not valid \(expected an integer in \[0, 4096\]\)"),
    ("threads", "2x", r"option threads: '2x'"),
    ("cpu_tile_rows", 0, r"option cpu_tile_rows: '0'"),
    ("cpu_gemv_max_rows", "some",
     r"option cpu_gemv_max_rows: 'some' is not valid \(expected auto or an integer in \[0, 1048576\]\)"),
    ("cuda_pdl", "yes", r"option cuda_pdl: 'yes' is not valid \(expected 0 or 1\)"),
    ("cuda_memory_limit", -5, r"option cuda_memory_limit: '-5'"),
    ("cuda_attention_keys", -1, r"option cuda_attention_keys: '-1' is not valid \(expected an integer in \[0, 1073741824\]\)"),
    ("cuda_attention_keys", "many", r"option cuda_attention_keys: 'many'"),
])
def test_bad_values_name_the_option_and_the_valid_values(name, value, expected):
    with pytest.raises(ValueError, match=expected):
        model(options={name: value})


def test_option_types():
    with pytest.raises(TypeError, match="options must be a dict"):
        model(options=[("threads", 1)])
    with pytest.raises(TypeError, match="option threads must be a str, int or bool, not float"):
        model(options={"threads": 1.5})
    with pytest.raises(TypeError, match="option names must be str"):
        model(options={1: "x"})


def test_environment_is_the_fallback_and_as_strict(monkeypatch):
    monkeypatch.setenv("XORON_CPU_ISA", "sse")
    with pytest.raises(ValueError, match=r"environment variable XORON_CPU_ISA: option cpu_isa: 'sse'"):
        model()
    monkeypatch.setenv("XORON_CPU_ISA", "generic")
    model()  # a valid variable is taken
    monkeypatch.delenv("XORON_CPU_ISA")
    monkeypatch.setenv("XORON_CUDA_NO_CUBLASLT", "1")
    with pytest.raises(ValueError, match=r"XORON_CUDA_NO_CUBLASLT is retired; use XORON_CUDA_GEMM=builtin"):
        model()


def test_build_info_says_what_the_build_has():
    info = xoron.build_info()
    assert set(info) == {"cuda", "cublaslt", "build_id"}
    assert isinstance(info["cuda"], bool) and isinstance(info["cublaslt"], bool)
    assert info["build_id"] == xoron._C.build_id
    assert info["build_id"].endswith("-cuda-cublaslt" if info["cublaslt"] else "-cuda" if info["cuda"] else "-cpu")
    assert info["cuda"] or not info["cublaslt"]  # no cuBLASLt path without the CUDA plugin


def test_cublaslt_library_needs_a_build_with_cublaslt(monkeypatch, tmp_path):
    """Asking for a cuBLASLt library is an error on a build without the cuBLASLt path (setup.py
    found no cublasLt.h), never silently the built-in GEMM; an empty path asks for nothing."""
    model(options={"cublaslt_library": ""})
    path = str(tmp_path / "libcublasLt.so.12")
    if xoron.build_info()["cublaslt"]:
        model(options={"cublaslt_library": path})  # taken; loaded only when a CUDA model is made
        return
    expected = r"option cublaslt_library: this build of xoron has no cuBLASLt path"
    with pytest.raises(RuntimeError, match=expected):
        model(options={"cublaslt_library": path})
    monkeypatch.setenv("XORON_CUBLASLT", path)
    with pytest.raises(RuntimeError, match=r"environment variable XORON_CUBLASLT: " + expected):
        model()


def test_cpu_options_keep_the_numbers():
    """Thread count, kernel set and the product paths are choices of speed, not of results."""
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 9))
    for dtype in ("float32", "bfloat16"):
        ref = model(dtype=dtype)(input_ids=ids).logits
        for opts in ({"threads": 1}, {"cpu_isa": "generic"}, {"cpu_gemv_max_rows": 0, "cpu_tile_rows": 5},
                     {"cpu_gemv_max_rows": 1000, "threads": True}, {"cuda_graphs": False, "cuda_moe": "host"}):
            got = model(dtype=dtype, options=opts)(input_ids=ids).logits
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=str(opts))


def test_from_pretrained_and_to_keep_the_options():
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        xoron.MoELlamaForCausalLM.from_pretrained(TINY_RING, options={"nope": 1})
    m = xoron.MoELlamaForCausalLM.from_pretrained(TINY_RING, options={"threads": 1, "cpu_isa": "generic"})
    ids = np.array([[1, 2, 3]])
    before = m(input_ids=ids).logits
    m.to(dtype="bfloat16").to(dtype="float32")
    np.testing.assert_allclose(m(input_ids=ids).logits, before, rtol=0, atol=3e-2 * np.abs(before).max())


def test_threads_apply_to_the_call_and_are_restored():
    """threads is this model's OpenMP setting for its own calls; the caller's is put back."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("gomp")
    if not name:
        pytest.skip("libgomp not found")
    gomp = ctypes.CDLL(name)
    before = gomp.omp_get_max_threads()
    m = model(options={"threads": 1})
    m(input_ids=np.array([[1, 2, 3]]))
    assert gomp.omp_get_max_threads() == before
