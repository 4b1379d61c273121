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


@pytest.mark.parametrize("kw, err, match", [
    (dict(length_penalty=float("inf"), num_beams=2), ValueError, "length_penalty"),
    (dict(eos_token_id="x"), ValueError, "eos_token_id"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(min_length=2.5), ValueError, "min_length"),
    (dict(max_length=3.0), ValueError, "max_length"),
    (dict(temperature="hot"), ValueError, "temperature"),
    (dict(stopping_criteria=[None]), TypeError, "stopping_criteria"),
    (dict(stop_strings="x", tokenizer=object()), TypeError, "token_bytes"),
    (dict(stop_strings=[3], tokenizer=object()), ValueError, "stop_strings"),
    (dict(past_key_values=(np.zeros(3),)), TypeError, "past_key_values"),
    (dict(output_hidden_states=True), ValueError, "output_hidden_states"),
    (dict(output_attentions=True), ValueError, "output_attentions is not supported"),
    (dict(inputs_embeds=np.zeros((2, 3, 32), np.float32)), ValueError, "rows"),
    (dict(inputs_embeds=np.zeros((1, 3, 5), np.float32)), ValueError, "inputs_embeds"),
])
def test_generate_bad_arguments_name_the_problem(kw, err, match):
    m = make_model(seed=0)
    with pytest.raises(err, match=match):
        m.model.generate(m.ids(1, 4), max_new_tokens=3, **kw)


def test_generate_cache_mismatches():
    m = make_model(seed=0)
    other = make_model(seed=1)
    ids = m.ids(2, 6)
    cache = m.model(input_ids=ids[:, :3], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="another model"):
        other.model.generate(ids, past_key_values=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="rows"):
        m.model.generate(ids[:1], past_key_values=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="not both"):
        m.model.generate(inputs_embeds=np.zeros((2, 3, 32), np.float32), past_key_values=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        m.model.generate(ids, past_key_values=cache, num_return_sequences=2, max_new_tokens=2)
    assert cache.length == 3  # the failed calls left it as it was
    with pytest.raises(ValueError, match="needs input_ids"):
        m.model.generate(max_new_tokens=2)
