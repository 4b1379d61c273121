"""generate() and forward() as transformers users call them: nothing silently ignored (issue 11 item 3)."""
import numpy as np
import pytest
from conftest import make_model


def test_unknown_generate_keyword_is_a_type_error_naming_it():
    m = make_model(seed=0)
    with pytest.raises(TypeError, match="max_new_token"):
        m.model.generate(m.ids(1, 3), max_new_token=5)
    with pytest.raises(TypeError, match="streamer"):
        next(m.model.generate_stream(m.ids(1, 3), streamer=object()))


def test_unknown_forward_keyword_is_a_type_error_naming_it():
    m = make_model(seed=0)
    with pytest.raises(TypeError, match="not_an_argument"):
        m.model(input_ids=m.ids(1, 3), not_an_argument=1)


def test_output_attentions_is_a_clear_error_and_outputs_carry_the_field():
    m = make_model(seed=0)
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        m.model(input_ids=m.ids(1, 3), output_attentions=True)
    out = m.model(input_ids=m.ids(1, 3), output_attentions=False)
    assert out.attentions is None and out["attentions"] is None
    assert len(out.to_tuple()) == 2  # logits, aux_loss: None fields are left out as in transformers
