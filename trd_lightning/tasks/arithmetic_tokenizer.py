"""A character-level `transformers` tokenizer for the arithmetic task, built in code.

It is a real `PreTrainedTokenizerFast` (save_pretrained / from_pretrained round-trip, padding,
batch encode/decode), so everything downstream uses the same code path as for a hub model.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<eos>", "<unk>")
CHARS = "0123456789+-*=|#!QRAS"


def build_arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One token per character; Fuse joins them back without spaces on decode.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )
