"""python -m xoron: generate, eval, bench, info, and its error handling."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "data", "heldout_sample.txt")
TINY = os.path.join(HERE, "data", "tiny_ring")


def xoron(*args, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "xoron", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


def test_help():
    r = xoron("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "eval" in r.stdout


def test_generate_is_reproducible_with_a_seed():
    a = xoron("generate", "Once upon a time", "--max-new-tokens", "24", "--seed", "3")
    b = xoron("generate", "Once upon a time", "--max-new-tokens", "24", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.startswith("Once upon a time") and len(a.stdout.split()) > 8
    assert re.search(r"prompt tokens: \d+, new tokens: 24, .* tokens/s", a.stderr)


def test_generate_greedy_and_stdin_prompt():
    r = xoron("generate", "-", "--greedy", "--max-new-tokens", "12", stdin="It is a truth universally acknowledged")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("It is a truth universally acknowledged")


def test_eval_prints_loss_and_perplexity():
    r = xoron("eval", SAMPLE, "--block", "256")
    assert r.returncode == 0, r.stderr
    m = re.search(r"loss: ([0-9.]+), perplexity: ([0-9.]+)", r.stdout)
    assert m and 1.0 < float(m.group(2)) < 200.0


def test_bench_and_info():
    r = xoron("bench", "--prompt-tokens", "32", "--new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stdout and "decode" in r.stdout
    r = xoron("info", TINY)
    assert r.returncode == 0 and "parameters: 699,584" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (("generate", "--model", "/no/such/dir"), "does not exist"),
    (("generate", "--model", HERE), "not a checkpoint"),
    (("generate", "--model", TINY), "no tokenizer.json"),
    (("generate", "--top-p", "1.5"), "--top-p"),
    (("generate", "--max-new-tokens", "-3"), "--max-new-tokens"),
    (("generate", "--temperature", "abc"), "--temperature"),
    (("generate", "--device", "tpu"), "device"),
    (("eval", "/no/such/file.txt"), "no such file"),
])
def test_errors_are_one_line_without_traceback(args, needle):
    r = xoron(*args)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("xoron: error:") and needle in lines[0]
    assert "Traceback" not in r.stderr
