"""forward(..., logits_to_keep=N) (alias num_logits_to_keep): the logits of the last N positions
only, equal to the matching slice of the full logits (to the rounding of a product over fewer
rows, SAME below); 0 (the default) keeps every position."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL_F32, make_model, rel_err

SAME = 1e-5  # the lm_head product over fewer rows may block (and round) its sums differently


@pytest.fixture(scope="module")
def built():
    return make_model({"num_key_value_heads": 2, "use_moe": True}, seed=5)


@pytest.mark.parametrize("keep", [1, 3, 11, 12, 40])
def test_kept_logits_are_the_slice_of_full_logits(built, keep):
    m = built.model
    ids = built.ids(2, 12, seed=1)
    full = m(input_ids=ids).logits
    got = m(input_ids=ids, logits_to_keep=keep).logits
    n = min(keep, 12)
    assert got.shape == (2, n, built.cfg.vocab_size)
    assert rel_err(got, full[:, -n:]) <= SAME
    ref, _ = built.ref(ids)
    assert rel_err(got, ref[:, -n:]) <= TOL_F32


def test_zero_keeps_every_position_and_the_alias_works(built):
    m = built.model
    ids = built.ids(1, 7, seed=2)
    full = m(input_ids=ids).logits
    np.testing.assert_array_equal(m(input_ids=ids, logits_to_keep=0).logits, full)
    assert rel_err(m(input_ids=ids, num_logits_to_keep=2).logits, full[:, -2:]) <= SAME
    assert rel_err(m(input_ids=ids, logits_to_keep=np.int64(1)).logits, full[:, -1:]) <= SAME


def test_prefill_with_one_kept_position_fills_the_cache(built):
    m = built.model
    ids = built.ids(2, 10, seed=3)
    full = m(input_ids=ids).logits
    out = m(input_ids=ids[:, :8], use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (2, 1, built.cfg.vocab_size)
    assert rel_err(out.logits, full[:, 7:8]) <= TOL_F32
    step = m(input_ids=ids[:, 8:], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    assert rel_err(step.logits, full[:, 9:10]) <= TOL_F32


def test_loss_needs_every_position(built):
    m = built.model
    ids = built.ids(1, 6, seed=4)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        m(input_ids=ids, labels=ids, logits_to_keep=2)
    whole = m(input_ids=ids, labels=ids)
    for keep in (0, 6, 9):  # all positions kept: the loss is the usual one
        assert m(input_ids=ids, labels=ids, logits_to_keep=keep).loss == whole.loss


@pytest.mark.parametrize("bad, err, msg", [
    (-1, ValueError, "logits_to_keep must be >= 0"),
    (1.5, TypeError, "logits_to_keep must be an int"),
    (True, TypeError, "logits_to_keep must be an int"),
    ([1, 2], TypeError, "a tensor of positions is not supported"),
])
def test_bad_logits_to_keep(built, bad, err, msg):
    with pytest.raises(err, match=msg):
        built.model(input_ids=built.ids(1, 4), logits_to_keep=bad)


def test_both_names_given_is_an_error(built):
    with pytest.raises(TypeError, match="not both"):
        built.model(input_ids=built.ids(1, 4), logits_to_keep=1, num_logits_to_keep=1)
    with pytest.raises(TypeError, match="num_logits_to_keep must be an int"):
        built.model(input_ids=built.ids(1, 4), num_logits_to_keep="2")
