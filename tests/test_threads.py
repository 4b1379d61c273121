"""CPU thread count (issue 14): the process default and its validation, the default's rule
(physical cores within the CPU affinity mask, OMP_NUM_THREADS when set), the CLI's --threads,
the OpenMP spin bound set only while the extension loads, and a decode beside a busy process."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xoron

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(os.path.dirname(xoron.__file__), "demo")


def run_python(code, env_drop=(), **env):
    e = {k: v for k, v in os.environ.items() if k not in env_drop}
    e.update(env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=e, cwd=ROOT)


@pytest.fixture
def restore_threads():
    before = xoron.get_num_threads()
    yield
    xoron.set_num_threads(before)


@pytest.mark.parametrize("bad, exc, needle", [
    (0, ValueError, "between 1 and 4096, got 0"),
    (-1, ValueError, "got -1"),
    (4097, ValueError, "got 4097"),
    (2 ** 70, ValueError, "beyond 64 bits"),
    (-2 ** 70, ValueError, "beyond 64 bits"),
    (1.5, TypeError, "must be an int, got float"),
    ("2", TypeError, "got str"),
    (True, TypeError, "got bool"),
    (None, TypeError, "got NoneType"),
])
def test_set_num_threads_rejects(bad, exc, needle, restore_threads):
    before = xoron.get_num_threads()
    with pytest.raises(exc, match=needle):
        xoron.set_num_threads(bad)
    assert xoron.get_num_threads() == before


def test_set_num_threads_changes_the_count_not_the_result(restore_threads):
    from conftest import make_model
    built = make_model({"hidden_size": 64, "intermediate_size": 96, "vocab_size": 301}, seed=4)
    ids = built.ids(2, 9)
    xoron.set_num_threads(1)
    assert xoron.get_num_threads() == 1
    one = np.asarray(built.model(input_ids=ids).logits)
    xoron.set_num_threads(3)
    assert xoron.get_num_threads() == 3
    three = np.asarray(built.model(input_ids=ids).logits)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-5 * float(np.abs(one).max()))


def test_default_is_physical_cores_of_the_affinity_mask():
    """Without OMP_NUM_THREADS the default is the physical cores the process may use: pinned to
    one CPU, one thread; OMP_NUM_THREADS, when set, is the default instead."""
    code = ("import os, xoron; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "print(xoron._C.physical_cores(), xoron.get_num_threads())")
    # the default is chosen on first use, after the affinity changed above
    r = run_python(code, env_drop=("OMP_NUM_THREADS",))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]
    r = run_python("import xoron; print(xoron.get_num_threads(), xoron._C.physical_cores())", OMP_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    threads, cores = map(int, r.stdout.split())
    assert threads == 3 and 1 <= cores <= os.cpu_count()


def test_spin_bound_is_set_only_while_loading():
    """GOMP_SPINCOUNT is set for libgomp's start-up unless the user chose a wait policy, and is
    not left in the environment (children and other OpenMP runtimes keep their defaults); a
    user's setting is kept as given."""
    code = "import os, xoron; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    r = run_python(code, env_drop=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None"]
    r = run_python(code, env_drop=("OMP_WAIT_POLICY",), GOMP_SPINCOUNT="12345")
    assert r.stdout.split() == ["12345", "None"]


def test_cli_threads_option():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "xoron", *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=ROOT)

    r = cli("generate", "Hello", "--greedy", "--max-new-tokens", "3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    for args in (["bench"], ["eval", "x.txt"], ["generate"], ["info"]):
        r = cli(*args, "--threads", "0")
        assert r.returncode == 1 and "thread count must be between 1 and 4096, got 0" in r.stderr, (args, r.stderr)
        r = cli(*args, "--threads", "two")
        assert r.returncode == 2 and "--threads must be an integer, got 'two'" in r.stderr, (args, r.stderr)


def test_decode_beside_a_busy_process_finishes():
    """A greedy decode of the demo model while a busy-looping child holds a core: it finishes
    and makes the same tokens as without the child (the speed is benchmarks/bench_cpu.py's)."""
    model = xoron.MoELlamaForCausalLM.from_pretrained(DEMO)
    prompt = np.arange(1, 9)[None]
    alone = np.asarray(model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=[]))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        beside = np.asarray(model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=[]))
    finally:
        busy.kill()
        busy.wait()
    assert beside.shape == (1, 32)
    np.testing.assert_array_equal(beside, alone)


@pytest.mark.parametrize("bad, exc, needle", [
    (-1, ValueError, r"option threads: '-1' is not valid \(expected an integer in \[0, 4096\]\)"),
    (4097, ValueError, r"'4097' is not valid"),
    (2 ** 70, ValueError, r"option threads: '1180591620717411303424' is not valid"),
    (1.5, TypeError, r"option threads must be a str, int or bool, not float"),
    ("two", ValueError, r"option threads: 'two' is not valid"),
])
def test_threads_option_rejects(bad, exc, needle):
    from conftest import small_config
    with pytest.raises(exc, match=needle):
        xoron.MoELlamaForCausalLM(small_config(), seed=0, options={"threads": bad})
    with pytest.raises(exc, match=needle):
        xoron.MoELlamaForCausalLM.from_pretrained(os.path.join(ROOT, "tests", "data", "tiny_ring"),
                                                  options={"threads": bad})


def test_threads_option_per_model():
    """A model's own count (0: the process default) serves its calls on whichever thread makes
    them; the results do not depend on the count."""
    import threading
    from conftest import make_model
    built = make_model({"hidden_size": 64, "intermediate_size": 96, "vocab_size": 301}, seed=4)
    ids = built.ids(1, 7)
    want = np.asarray(built.model(input_ids=ids).logits)
    sd = built.model.state_dict()
    got = {}
    for n in (0, 1, 2):
        m = xoron.MoELlamaForCausalLM(built.config, seed=0, options={"threads": n})
        m.load_state_dict(sd)
        worker = threading.Thread(target=lambda: got.__setitem__(n, np.asarray(m(input_ids=ids).logits)))
        worker.start()
        worker.join()
        np.testing.assert_allclose(got[n], want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_team_size_rule():
    """A model's own count, or a process default the user chose, is the team size as given;
    the automatic default (no OMP_NUM_THREADS, no set_num_threads) gives way to other runnable
    work, within 1 .. the physical cores (how much it gives depends on the moment's load)."""
    # the test-only extension carries its own copy of the engine: its default is set there
    code = ("import ctypes, xoron; from xoron import _testing; lib = ctypes.CDLL(_testing.__file__); "
            "auto = lib.xo_hook_team(0); own = lib.xo_hook_team(3); assert lib.xo_hook_set_default_threads(5) == 0; "
            "print(auto, own, lib.xo_hook_team(0), xoron._C.physical_cores())")
    r = run_python(code, env_drop=("OMP_NUM_THREADS",))
    assert r.returncode == 0, r.stderr
    auto, own, chosen, cores = map(int, r.stdout.split())
    assert 1 <= auto <= cores and own == 3 and chosen == 5
    r = run_python("import ctypes; from xoron import _testing; print(ctypes.CDLL(_testing.__file__).xo_hook_team(0))",
                   OMP_NUM_THREADS="3")
    assert r.returncode == 0 and int(r.stdout) == 3, r.stderr


def test_runnable_count_read_again_each_time():
    """The automatic team size reads the runnable count from /proc/loadavg at each step, from a
    file kept open and read again from its start: every read parses (this caller is runnable,
    so at least 1; 0 would mean the read or the parse failed) and stays within the task count."""
    import ctypes
    from xoron import _testing
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("no /proc/loadavg on this system")
    lib = ctypes.CDLL(_testing.__file__)
    lib.xo_hook_runnable_now.restype = ctypes.c_long
    for _ in range(3):
        got = lib.xo_hook_runnable_now()
        with open("/proc/loadavg") as f:
            running, total = map(int, f.read().split()[3].split("/"))
        assert 1 <= got <= total + 64   # tasks come and go between the two reads
