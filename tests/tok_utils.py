"""Tiny local tokenizers for the data tests (no hub access), with ids you can derive by hand.

``word_tokenizer``: WordLevel over whitespace-separated words (whitespace and newlines vanish),
special tokens matched first. Ids (``ID``): 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4 <|im_start|>,
5 <|im_end|>, 6 <|begin_of_text|>, 7 <|start_header_id|>, 8 <|end_header_id|>, 9 <|eot_id|>,
then the letters a..j = 10..19, then system, user, assistant, Hi, Hello, Bye = 20..25.

``seam_tokenizer``: a character BPE with one merge ("a", "b") -> "ab", so prompt "xa" + answer
"b" merges across the seam. Ids: 0 <pad>, 1 <s>, 2 </s>, 3 x, 4 a, 5 b, 6 c, 7 ab.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<pad>", "<s>", "</s>", "<unk>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]
WORDS = list("abcdefghij") + ["system", "user", "assistant", "Hi", "Hello", "Bye"]
ID = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}

# ChatML (Qwen / SmolLM2 style, without a default system prompt); no literal "system" in it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3-Instruct's template (it mentions neither "system" nor "<|im_start|>").
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def word_tokenizer(bos: str | None = "<s>", eos: str = "</s>", template: str | None = None):
    """WordLevel tokenizer over ``ID``; ``bos=None`` gives a tokenizer without BOS."""
    tok = Tokenizer(models.WordLevel(vocab=dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    kwargs = {"bos_token": bos} if bos else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>", unk_token="<unk>", **kwargs)
    if template:
        hf.chat_template = template
    return hf


def chatml_tokenizer(bos: str | None = "<s>"):
    """ChatML template, EOS <|im_end|>; ``bos=None`` is the Qwen-like no-BOS variant."""
    return word_tokenizer(bos=bos, eos="<|im_end|>", template=CHATML_TEMPLATE)


def llama3_tokenizer():
    """Llama-3 template, BOS <|begin_of_text|> (rendered by the template), EOS <|eot_id|>."""
    return word_tokenizer(bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE)


def seam_tokenizer():
    """Character BPE whose merge ("a", "b") -> "ab" crosses a prompt/answer seam."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "x": 3, "a": 4, "b": 5, "c": 6, "ab": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class TableTokenizer:
    """Duck-typed tokenizer mapping whole texts to fixed ids (for seam cases BPE can't produce)."""

    def __init__(self, table: dict[str, list[int]], bos_token_id=1, eos_token_id=2):
        self.table, self.bos_token_id, self.eos_token_id = table, bos_token_id, eos_token_id
        self.bos_token = "<s>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False
        return {"input_ids": list(self.table[text])}
