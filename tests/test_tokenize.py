"""Rendering and tokenizing one pair (docs/design.md §2). Expected ids are spelled out by hand from the
vocabularies documented in tok_utils.py (letters a..j = 10..19; <s> 1, </s> 2)."""

from types import SimpleNamespace

import pytest
from tok_utils import ID, TableTokenizer, chatml_tokenizer, llama3_tokenizer, seam_tokenizer, word_tokenizer

from simpo_ds.data.tokenize import DataError, render_pair, tokenize_pair, tokenize_row

BOS, EOS = 1, 2
IM_START, IM_END = ID["<|im_start|>"], ID["<|im_end|>"]
SYSTEM, USER, ASSISTANT, HI, HELLO, BYE = (ID[w] for w in ("system", "user", "assistant", "Hi", "Hello", "Bye"))

CONV = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}],
}


def pair(tok, prompt, chosen, rejected, max_length=100, max_prompt_length=50, mode="keep_end"):
    return tokenize_pair(
        prompt, chosen, rejected, tok, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode
    )


# ---- BOS / EOS ---------------------------------------------------------------------------------


def test_plain_pair_gets_bos_and_eos():
    out = pair(word_tokenizer(), "a b", " c", " d e")
    assert out == {
        "chosen_input_ids": [BOS, 10, 11, 12, EOS],
        "chosen_prompt_len": 3,
        "rejected_input_ids": [BOS, 10, 11, 13, 14, EOS],
        "rejected_prompt_len": 3,
        "drop_reason": "",
    }


def test_bos_not_doubled_when_text_starts_with_bos():
    out = pair(word_tokenizer(), "<s>a b", " c", " d")
    assert out["chosen_input_ids"] == [BOS, 10, 11, 12, EOS]
    assert out["rejected_input_ids"] == [BOS, 10, 11, 13, EOS]


def test_eos_not_doubled_when_answer_ends_with_eos():
    out = pair(word_tokenizer(), "a", " b</s>", " c")
    assert out["chosen_input_ids"] == [BOS, 10, 11, EOS]
    assert out["rejected_input_ids"] == [BOS, 10, 12, EOS]


def test_tokenizer_without_bos_gets_no_bos():
    tok = word_tokenizer(bos=None)
    assert tok.bos_token_id is None
    out = pair(tok, "a b", " c", " d")
    assert out["chosen_input_ids"] == [10, 11, 12, EOS] and out["chosen_prompt_len"] == 2
    assert out["rejected_input_ids"] == [10, 11, 13, EOS] and out["rejected_prompt_len"] == 2


def test_tokenizer_without_eos_is_an_error():
    tok = TableTokenizer({"p": [3], "pa": [3, 4], "pb": [3, 5]}, eos_token_id=None)
    with pytest.raises(DataError, match="eos_token"):
        pair(tok, "p", "a", "b")


# ---- seam ----------------------------------------------------------------------------------------


def test_seam_merge_moves_last_prompt_token_into_answer():
    # seam BPE: x=3 a=4 b=5 c=6 ab=7. enc("xa")=[x,a]; enc("xab")=[x,ab]: the prompt's "a" merged
    # with the chosen answer, so the chosen prompt is [x] and its answer [ab]; enc("xac")=[x,a,c]
    # does not merge, so the rejected prompt keeps "a": the two prompts differ in the last token.
    out = pair(seam_tokenizer(), "xa", "b", "c")
    assert out["chosen_input_ids"] == [BOS, 3, 7, EOS] and out["chosen_prompt_len"] == 2
    assert out["rejected_input_ids"] == [BOS, 3, 4, 6, EOS] and out["rejected_prompt_len"] == 3
    assert out["drop_reason"] == ""


def test_prompts_differing_beyond_the_seam_token_are_dropped():
    # enc("pqr") = [3,4,5] but enc("pqr"+"a") re-tokenizes the whole prompt: the seam rule gives
    # the chosen prompt [9,8], which differs from the rejected prompt [3,4,5] in 2 tokens (the
    # reference raises there; one differing token plus one length is what a seam merge can do).
    tok = TableTokenizer({"pqr": [3, 4, 5], "pqra": [9, 8, 7, 6], "pqrb": [3, 4, 5, 6]})
    out = pair(tok, "pqr", "a", "b")
    assert out["drop_reason"] == "chosen/rejected prompts differ beyond the seam token"
    assert out["chosen_input_ids"] == [] and out["rejected_input_ids"] == []


# ---- truncation ----------------------------------------------------------------------------------
# prompt "a b c d e" -> [BOS,10,11,12,13,14] (6 tokens); chosen " f g" -> [15,16,EOS] (3);
# rejected " h" -> [17,EOS] (2); so the longer answer has 3 tokens.

PROMPT, CHOSEN, REJECTED = "a b c d e", " f g", " h"


def test_no_truncation_when_it_fits():
    out = pair(word_tokenizer(), PROMPT, CHOSEN, REJECTED, max_length=9, max_prompt_length=4)
    assert out["chosen_input_ids"] == [BOS, 10, 11, 12, 13, 14, 15, 16, EOS]


def test_keep_end_truncates_prompt_to_its_last_tokens():
    # 6 + 3 > 7 -> prompt keeps its last 4 tokens (the reference drops BOS here too); 4 + 3 <= 7.
    out = pair(word_tokenizer(), PROMPT, CHOSEN, REJECTED, max_length=7, max_prompt_length=4, mode="keep_end")
    assert out["chosen_input_ids"] == [11, 12, 13, 14, 15, 16, EOS] and out["chosen_prompt_len"] == 4
    assert out["rejected_input_ids"] == [11, 12, 13, 14, 17, EOS] and out["rejected_prompt_len"] == 4


def test_keep_start_truncates_prompt_to_its_first_tokens():
    out = pair(word_tokenizer(), PROMPT, CHOSEN, REJECTED, max_length=7, max_prompt_length=4, mode="keep_start")
    assert out["chosen_input_ids"] == [BOS, 10, 11, 12, 15, 16, EOS] and out["chosen_prompt_len"] == 4
    assert out["rejected_input_ids"] == [BOS, 10, 11, 12, 17, EOS] and out["rejected_prompt_len"] == 4


def test_answers_cut_to_max_length_minus_max_prompt_length():
    # 6 + 3 > 6 -> prompt to 4; 4 + 3 > 6 still -> both answers to their first 6 - 4 = 2 tokens
    # (chosen loses its EOS, as in the reference; rejected [17, EOS] already fits).
    out = pair(word_tokenizer(), PROMPT, CHOSEN, REJECTED, max_length=6, max_prompt_length=4)
    assert out["chosen_input_ids"] == [11, 12, 13, 14, 15, 16] and out["chosen_prompt_len"] == 4
    assert out["rejected_input_ids"] == [11, 12, 13, 14, 17, EOS] and out["rejected_prompt_len"] == 4


def test_longer_answer_decides_truncation_of_both():
    # prompt "a b" (3 with BOS) fits with the short rejected answer but not with the chosen one:
    # both sequences use the longer answer's length (5), so both prompts are cut (keep_start).
    out = pair(word_tokenizer(), "a b", " c d e f", " g", max_length=7, max_prompt_length=2, mode="keep_start")
    assert out["chosen_input_ids"] == [BOS, 10, 12, 13, 14, 15, EOS]
    assert out["rejected_input_ids"] == [BOS, 10, 16, EOS]


def test_seam_prompts_use_their_own_length_for_truncation():
    # chosen prompt [BOS,3] (2 tokens), rejected prompt [BOS,3,4] (3); longer answer = 2.
    # max_length 4: only the rejected sequence (3 + 2 > 4) is truncated (reference per-sequence rule).
    out = pair(seam_tokenizer(), "xa", "b", "c", max_length=4, max_prompt_length=2, mode="keep_start")
    assert out["chosen_input_ids"] == [BOS, 3, 7, EOS]
    assert out["rejected_input_ids"] == [BOS, 3, 6, EOS] and out["rejected_prompt_len"] == 2


def test_empty_answer_after_truncation_is_dropped_not_raised():
    out = pair(word_tokenizer(), PROMPT, CHOSEN, REJECTED, max_length=4, max_prompt_length=4)
    assert out == {
        "chosen_input_ids": [],
        "chosen_prompt_len": 0,
        "rejected_input_ids": [],
        "rejected_prompt_len": 0,
        "drop_reason": "empty chosen answer after truncation",
    }


def test_every_kept_sequence_fits_max_length():
    tok = word_tokenizer()
    prompts = ["a", "a b c d e f g h i j", "<s>a b c"]
    answers = [" b", " c d e f g h", " i j</s>", ""]
    for max_length, max_prompt_length in [(3, 1), (5, 2), (8, 6), (12, 4)]:
        for p in prompts:
            for c in answers:
                for r in answers:
                    for mode in ("keep_end", "keep_start"):
                        out = pair(tok, p, c, r, max_length, max_prompt_length, mode)
                        assert out["drop_reason"] == ""
                        for name in ("chosen", "rejected"):
                            ids, n = out[f"{name}_input_ids"], out[f"{name}_prompt_len"]
                            assert len(ids) <= max_length and 0 < len(ids) - n
                            assert n <= max(max_prompt_length, len(tok(p, add_special_tokens=False)["input_ids"]) + 1)


# ---- chat templates ------------------------------------------------------------------------------

CHATML_PROMPT = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_render_standard_row_passes_through():
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    assert render_pair(row, word_tokenizer()) == ("p", "c", "r")


def test_render_reference_mode_chatml_inserts_empty_system_and_renders_answers_alone():
    texts = render_pair(CONV, chatml_tokenizer(), mode="reference")
    assert texts == (
        CHATML_PROMPT,
        "<|im_start|>assistant\nHello<|im_end|>\n",
        "<|im_start|>assistant\nBye<|im_end|>\n",
    )


def test_render_generation_prompt_mode_chatml():
    texts = render_pair(CONV, chatml_tokenizer(), mode="generation_prompt")
    assert texts == (CHATML_PROMPT + "<|im_start|>assistant\n", "Hello<|im_end|>\n", "Bye<|im_end|>\n")


def test_render_without_auto_system_message():
    texts = render_pair(CONV, chatml_tokenizer(), auto_insert_empty_system_msg=False)
    assert texts[0] == "<|im_start|>user\nHi<|im_end|>\n"


def test_existing_system_message_is_kept():
    row = {k: [{"role": "system", "content": "Be brief"}] + v for k, v in CONV.items()}
    texts = render_pair(row, chatml_tokenizer())
    assert texts[0] == "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_render_reference_mode_llama3_no_system_and_bos_stripped_from_answers():
    # the Llama-3 template mentions neither "system" nor "<|im_start|>": no system message; it
    # renders bos_token first, which the reference strips from the answers only.
    texts = render_pair(CONV, llama3_tokenizer(), mode="reference")
    assert texts == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\nBye<|eot_id|>",
    )


def test_render_generation_prompt_mode_llama3():
    texts = render_pair(CONV, llama3_tokenizer(), mode="generation_prompt")
    assert texts == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "Hello<|eot_id|>",
        "Bye<|eot_id|>",
    )


def test_explicit_prompt_messages_and_single_message_answers():
    row = {"prompt": CONV["chosen"][:1], "chosen": CONV["chosen"][1:], "rejected": CONV["rejected"][1:]}
    assert render_pair(row, chatml_tokenizer()) == render_pair(CONV, chatml_tokenizer())


def test_string_prompt_with_conversational_answers_uses_chosen_prefix():
    # ultrafeedback_binarized layout: prompt is the raw user string, chosen/rejected full chats
    row = dict(CONV, prompt="Hi")
    assert render_pair(row, chatml_tokenizer()) == render_pair(CONV, chatml_tokenizer())


def test_mismatched_conversational_prompt_is_an_error():
    row = dict(CONV, rejected=[{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Bye"}])
    with pytest.raises(DataError, match=r"prompt mismatch: 'rejected'\[:-1\]"):
        render_pair(row, chatml_tokenizer())


def test_last_message_must_be_assistant():
    row = dict(CONV, chosen=[{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}])
    with pytest.raises(DataError, match="last message of 'chosen'"):
        render_pair(row, chatml_tokenizer())


def test_conversational_row_without_chat_template_is_an_error():
    with pytest.raises(DataError, match="chat_template"):
        render_pair(CONV, word_tokenizer())


# ---- render + tokenize ---------------------------------------------------------------------------


def cfg(**kw):
    base = dict(
        max_length=64,
        max_prompt_length=32,
        truncation_mode="keep_end",
        chat_template_mode="reference",
        auto_insert_empty_system_msg=True,
    )
    return SimpleNamespace(**{**base, **kw})


def test_tokenize_row_chatml_reference():
    # EOS is <|im_end|>, already last in the rendered answer: not doubled; BOS <s> prepended.
    out = tokenize_row(CONV, chatml_tokenizer(), cfg())
    prompt = [BOS, IM_START, SYSTEM, IM_END, IM_START, USER, HI, IM_END]
    assert out["chosen_input_ids"] == prompt + [IM_START, ASSISTANT, HELLO, IM_END]
    assert out["rejected_input_ids"] == prompt + [IM_START, ASSISTANT, BYE, IM_END]
    assert out["chosen_prompt_len"] == out["rejected_prompt_len"] == 8


def test_tokenize_row_chatml_generation_prompt_without_bos_tokenizer():
    out = tokenize_row(CONV, chatml_tokenizer(bos=None), cfg(chat_template_mode="generation_prompt"))
    prompt = [IM_START, SYSTEM, IM_END, IM_START, USER, HI, IM_END, IM_START, ASSISTANT]
    assert out["chosen_input_ids"] == prompt + [HELLO, IM_END] and out["chosen_prompt_len"] == 9
    assert out["rejected_input_ids"] == prompt + [BYE, IM_END]


def test_tokenize_row_llama3_bos_from_template_not_doubled():
    out = tokenize_row(CONV, llama3_tokenizer(), cfg())
    h0, h1, eot = ID["<|start_header_id|>"], ID["<|end_header_id|>"], ID["<|eot_id|>"]
    prompt = [ID["<|begin_of_text|>"], h0, USER, h1, HI, eot]
    assert out["chosen_input_ids"] == prompt + [h0, ASSISTANT, h1, HELLO, eot]
    assert out["chosen_prompt_len"] == 6
