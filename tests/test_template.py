"""The one template/EOS module: where generation stops, what a written model carries, the contract check."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from align.core.errors import AlignError
from align.core.template import (
    check_template_contract, end_of_turn_id, stop_token_ids, template_contract, write_template,
)
from conftest import make_char_tokenizer, save_tiny_model

IM_END, S = 3, 1  # ids in the char tokenizer: <|im_end|> closes a turn and is EOS; <s> is BOS


def test_a_turn_ends_where_the_template_closes_it_not_at_a_plain_eos():
    tokenizer = make_char_tokenizer()
    tokenizer.eos_token = "<s>"  # a base model whose EOS is not the template's end of turn
    assert end_of_turn_id(tokenizer) == IM_END
    assert stop_token_ids(tokenizer) == [IM_END, S]


def test_loading_keeps_the_stops_a_model_already_had():
    assert stop_token_ids(make_char_tokenizer(), [7, IM_END]) == [IM_END, 7]
    assert end_of_turn_id(make_char_tokenizer(chat_template=None)) == IM_END  # no template: EOS


def test_written_template_replaces_the_inputs_stops_with_the_source_s(tmp_path):
    merged = save_tiny_model(tmp_path / "merged")
    generation = GenerationConfig.from_pretrained(merged)
    generation.eos_token_id = S  # what mergekit copied from an input that stops at <s>
    generation.save_pretrained(merged)
    source = tmp_path / "sft"
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tokenizer.save_pretrained(source)

    assert write_template(merged, source) == IM_END
    assert GenerationConfig.from_pretrained(merged).eos_token_id == IM_END
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == tokenizer.chat_template


def test_a_broken_contract_names_the_key_and_both_values():
    tokenizer = make_char_tokenizer()
    recorded = template_contract(tokenizer)
    check_template_contract(recorded, tokenizer, "dpo", "the SFT stage")
    tokenizer.pad_token = "<s>"
    with pytest.raises(AlignError, match=r"broken at dpo: pad_token is '<s>' but the SFT stage recorded '<pad>'"):
        check_template_contract(recorded, tokenizer, "dpo", "the SFT stage")
