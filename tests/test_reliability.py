"""One model shared by threads, callbacks that call back into it, streams left early, Ctrl-C.

Each test guards against a hang with a timeout that fails it (a thread joined with a timeout,
or a child process run with one), so a regression fails CI instead of stalling it."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import small_config

from xoron import MoELlamaForCausalLM

HANG = 60  # seconds after which a scenario counts as hung


def _model(**kw):
    return MoELlamaForCausalLM(small_config(**kw), seed=5)


def _ids(b=1, t=3):
    return np.arange(1, 1 + b * t, dtype=np.int64).reshape(b, t) % 90 + 1


def _in_thread(fn):
    """Runs fn() in a thread; fails if it has not finished within HANG seconds."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(HANG)
    assert not th.is_alive(), "the call hung"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_cache_reads_race_a_forward_that_grows_it():
    m = _model()
    c = m.new_cache(2)
    stop = threading.Event()
    seen, failures = [], []

    def reader():
        while not stop.is_set():
            try:
                mask = c.attention_mask()
                assert mask.shape[0] == 2 and c.length >= mask.shape[1] and c.nbytes >= 0
                seen.append(mask.shape[1])
            except BaseException as e:
                failures.append(e)
                return

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    deadline = time.monotonic() + 2.0
    steps = 0
    try:
        while time.monotonic() < deadline:  # each step grows the cache, reallocating its host mask now and then
            m(_ids(2, 5), past_key_values=c, use_cache=True)
            steps += 1
    finally:
        stop.set()
        th.join(HANG)
    assert not th.is_alive() and not failures, failures
    assert c.length == 5 * steps
    assert c.attention_mask().shape == (2, 5 * steps) and c.attention_mask().all()
    assert seen and all(n % 5 == 0 for n in seen)  # never a half-written step


class _CallingStreamer:
    """A streamer that calls the model it streams from (to score text, say)."""

    def __init__(self, call):
        self.call, self.errors = call, []

    def put(self, ids):
        try:
            self.call()
        except RuntimeError as e:
            self.errors.append(e)
            raise

    def end(self):
        pass


@pytest.mark.parametrize("inner", ["forward", "generate", "state_dict", "new_cache"])
def test_reentrant_call_from_a_streamer_is_refused_at_once(inner):
    m = _model()
    calls = {"forward": lambda: m(_ids()), "generate": lambda: m.generate(_ids(), max_new_tokens=2),
             # the engine's copy (the torch module's state_dict() reads its Parameter views, no engine call)
             "state_dict": lambda: m._engine.state_dict(), "new_cache": lambda: m.new_cache(1)}
    s = _CallingStreamer(calls[inner])
    with pytest.raises(RuntimeError, match="re-entrant call"):
        _in_thread(lambda: m.generate(_ids(), max_new_tokens=4, do_sample=False, streamer=s))
    assert len(s.errors) == 1
    out = m.generate(_ids(), max_new_tokens=4, do_sample=False)  # the model is free again
    assert out.shape == (1, 7)


def test_a_streamer_may_read_a_cache_of_the_same_model():
    m = _model()
    c = m.new_cache(1)
    m(_ids(), past_key_values=c, use_cache=True)
    lengths = []

    class Reader:
        def put(self, ids):
            lengths.append((c.length, c.attention_mask().shape))

        def end(self):
            pass

    _in_thread(lambda: m.generate(_ids(), max_new_tokens=3, do_sample=False, streamer=Reader()))
    assert lengths == [(3, (1, 3))] * 4  # the prompt, then one call per new token


def test_a_call_from_another_thread_waits_for_the_running_one():
    m = _model()
    started, results = threading.Event(), []

    class Slow:
        def put(self, ids):
            started.set()
            time.sleep(0.01)

        def end(self):
            pass

    th = threading.Thread(target=lambda: results.append(
        m.generate(_ids(), max_new_tokens=20, do_sample=False, streamer=Slow())))
    th.start()
    assert started.wait(HANG)
    logits = m(_ids()).logits  # waits for the lock with the GIL released: the generation goes on
    th.join(HANG)
    assert not th.is_alive() and results[0].shape == (1, 23)
    np.testing.assert_array_equal(logits, m(_ids()).logits)


def _counting(monkeypatch, hold_at):
    """Wraps generate() so that the streamer's calls are counted; call number hold_at waits
    for the returned event, so that the generation is not ahead of its consumer."""
    from xoron import generation
    puts, leaving = [], threading.Event()
    plain = generation.generate

    def generate(model, input_ids=None, streamer=None, **kw):
        if streamer is None:
            return plain(model, input_ids, **kw)

        class Counting:
            def put(self, ids):
                puts.append(1)
                if len(puts) == hold_at:
                    leaving.wait(HANG)
                streamer.put(ids)

            def end(self):
                streamer.end()

        return plain(model, input_ids, streamer=Counting(), **kw)

    monkeypatch.setattr(generation, "generate", generate)
    return puts, leaving


@pytest.mark.parametrize("how", ["break", "close", "garbage"])
def test_leaving_generate_stream_stops_the_generation(how, monkeypatch):
    m = _model()
    puts, leaving = _counting(monkeypatch, hold_at=5)  # the prompt, 3 tokens taken, the 4th held
    stream = m.generate_stream(_ids(), max_new_tokens=20000, do_sample=False, eos_token_id=None)
    got = []
    for tok in stream:
        got.append(tok)
        if len(got) == 3:
            break
    leaving.set()
    if how == "close":
        stream.close()
    else:
        del stream
        if how == "garbage":
            gc.collect()
    # the worker has stopped at the held token: one step after the consumer left
    assert len(puts) == 5
    assert threading.active_count() == 1
    assert m.generate(_ids(), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_generate_stream_still_runs_to_the_end():
    m = _model()
    toks = list(m.generate_stream(_ids(), max_new_tokens=6, do_sample=False, eos_token_id=None))
    full = m.generate(_ids(), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert toks == list(full[0, 3:])


def test_engine_init_on_a_live_engine_is_refused():
    m = _model()
    c = m.new_cache(1)
    m(_ids(), past_key_values=c, use_cache=True)
    from xoron.config import engine_dict
    big = small_config(hidden_size=64)
    with pytest.raises(RuntimeError, match="already initialised"):
        m._engine.__init__(engine_dict(m.config), "float32", "cpu")
    with pytest.raises(RuntimeError, match="already initialised"):
        m._engine.__init__(big)
    assert c.length == 3 and m(_ids(), past_key_values=c, use_cache=True).logits.shape == (1, 3, 97)


# ---- Ctrl-C ----

_CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    import numpy as np
    # started from a background job the interpreter inherits SIGINT ignored and installs no handler:
    # give it Python's, as an interactive session has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from conftest import small_config
    from xoron import MoELlamaForCausalLM

    m = MoELlamaForCausalLM(small_config(hidden_size=64), seed=1)
    ids = np.ones((1, 4), dtype=np.int64)
    c = m.new_cache(1)
    m(ids, past_key_values=c, use_cache=True)

    def interrupt_soon():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    def stream():
        for _ in m.generate_stream(ids, max_new_tokens=100000, do_sample=False, eos_token_id=None):
            pass

    class StopWhenSet:
        def __init__(self):
            self.started, self.stop, self.calls = threading.Event(), threading.Event(), 0
        def put(self, ids):
            self.calls += 1
            if self.calls == 2:  # a new token: the generation holds the lock
                self.started.set()
            if self.stop.is_set():
                raise RuntimeError("stopped")
        def end(self):
            pass

    def locked_out():  # Ctrl-C while waiting for the lock that another thread's generate holds
        s = StopWhenSet()
        th = threading.Thread(target=lambda: m.generate(ids, max_new_tokens=100000, do_sample=False,
                                                        eos_token_id=None, streamer=s), daemon=True)
        th.start()
        s.started.wait()
        try:
            m(ids)
        finally:
            s.stop.set()
            th.join()

    work = {{
        "generate": lambda: m.generate(ids, max_new_tokens=100000, do_sample=False, eos_token_id=None),
        "stream": stream,
        "forward": lambda: m(np.ones((1, 60000), dtype=np.int64) % 97, past_key_values=c, use_cache=True),
        "locked_out": locked_out,
    }}[sys.argv[1]]
    interrupt_soon()
    try:
        work()
        print("completed")
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    time.sleep(0.05)  # a second signal would arrive here, not in the checks below
    print("cache", c.length, c.attention_mask().tolist())
    print("after", m.generate(ids, max_new_tokens=2, do_sample=False).tolist())
""")


@pytest.mark.parametrize("work", ["generate", "stream", "forward", "locked_out"])
def test_ctrl_c_stops_a_long_call_and_the_model_stays_usable(work):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    # without the interrupt each call runs for minutes; the timeout turns that into a failure
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=here), work], env=env,
                          capture_output=True, text=True, timeout=HANG)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[0] == "KeyboardInterrupt", proc.stdout
    assert lines[1] == "cache 4 [[1, 1, 1, 1]]"  # an interrupted forward leaves the cache as it was
    assert lines[2] == "after " + str(_expected_after())


def _expected_after():
    m = MoELlamaForCausalLM(small_config(hidden_size=64), seed=1)
    return m.generate(np.ones((1, 4), dtype=np.int64), max_new_tokens=2, do_sample=False).tolist()


def test_sigint_handler_of_python_is_kept():
    # the engine's handler sits in front of Python's: a custom Python handler still runs, and
    # calls are then not interrupted (the user chose what Ctrl-C does)
    m = _model()
    hits = []
    old = signal.signal(signal.SIGINT, lambda *a: hits.append(1))
    try:
        m(_ids())
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert m.generate(_ids(), max_new_tokens=3, do_sample=False).shape == (1, 6)
        for _ in range(100):
            if hits:
                break
            time.sleep(0.01)
        assert hits == [1]
    finally:
        signal.signal(signal.SIGINT, old)
    assert signal.getsignal(signal.SIGINT) is old


_SIGNAL_GUARD_CHILD = textwrap.dedent("""
    import ctypes, os, signal, sys, threading
    import numpy as np
    # started from a background job the interpreter inherits SIGINT ignored and installs no handler:
    # give it Python's, as an interactive session has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from conftest import small_config
    from xoron import MoELlamaForCausalLM

    before = set(os.listdir("/proc/self/task"))  # numpy's BLAS threads, say: they run no sgemm of ours
    m = MoELlamaForCausalLM(small_config(hidden_size=64), seed=1)
    m(np.ones((1, 200), dtype=np.int64))  # a call: the team is started and guarded
    libc = ctypes.CDLL(None, use_errno=True)

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
    st = StackT()
    assert libc.sigaltstack(None, ctypes.byref(st)) == 0
    # SS_DISABLE = 2. A stack the thread had already is kept (ASan's is 4 x SIGSTKSZ: 54,016 bytes
    # on an AVX-512 machine), so the bound is a signal frame's minimum with room, not our size.
    min_frame = os.sysconf("SC_MINSIGSTKSZ") if "SC_MINSIGSTKSZ" in os.sysconf_names else 2048
    print("caller alt stack", not (st.ss_flags & 2) and st.ss_size >= max(4 * min_frame, 16384))

    act = ctypes.create_string_buffer(256)  # struct sigaction: handler, 128-byte mask, int flags, ...
    assert libc.sigaction(signal.SIGINT, None, act) == 0
    flags = int.from_bytes(act.raw[8 + 128:8 + 128 + 4], "little")
    print("handler on alt stack", bool(flags & 0x08000000))  # SA_ONSTACK

    python_threads = {{t.native_id for t in threading.enumerate()}}
    workers = [int(t) for t in set(os.listdir("/proc/self/task")) - before if int(t) not in python_threads]
    def blocks_sigint(tid):
        with open(f"/proc/self/task/{{tid}}/status") as f:
            blk = next(int(l.split()[1], 16) for l in f if l.startswith("SigBlk:"))
        return bool(blk & (1 << (signal.SIGINT - 1)))
    print("workers", len(workers) > 0, all(blocks_sigint(t) for t in workers))
    print("caller blocks sigint", blocks_sigint(threading.main_thread().native_id))
""")


def test_signals_never_land_in_onednn_sgemm():
    # oneDNN's JIT sgemm (3.2) points rsp at a heap buffer while it runs: a signal handled on
    # that thread writes its frame over the heap (the "corrupted size vs. prev_size" aborts
    # of the Ctrl-C bench). The team's threads block signals; the caller, which still takes
    # Ctrl-C, has its handler run on an alternate stack.
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_GUARD_CHILD.format(tests=here)], env=env,
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["caller alt stack True", "handler on alt stack True", "workers True True",
                                        "caller blocks sigint False"], proc.stdout
