"""Fixtures of the math path: a tiny chat tokenizer and models built in code, and jsonl files.

The tokenizer is character-level with Qwen-style special tokens and a Jinja ``chat_template``: a
real `PreTrainedTokenizerFast`, saved and loaded like a hub tokenizer, standing in for Qwen3's.
"""

from __future__ import annotations

import json
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trd_lightning.models import build_tiny_causal_lm

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHARS = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=1024,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = chat_template
    return tok


ROWS = [
    {"problem": "What is 2+3?", "solution": "2+3=5, so \\boxed{5}.", "answer": "5"},
    {"problem": "Halve 1.", "solution": "1/2 = \\boxed{\\frac{1}{2}}", "answer": "\\frac{1}{2}"},
    {"problem": "What is 3*3?", "solution": "3*3=9. \\boxed{9}", "answer": "9"},
    {"problem": "What is 7-4?", "solution": "7-4=3. \\boxed{3}", "answer": "3"},
]


def write_jsonl(path, rows, blank_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def save_chat_model(path, tokenizer, seed: int, hidden_size: int = 32) -> str:
    """A tiny Llama with room for chat-rendered refinement contexts (1024 positions)."""
    model = build_tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=2, num_heads=2, max_position_embeddings=1024, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_chat_setup(root) -> dict[str, str]:
    """Student, teacher and train/val/test jsonl files under ``root``."""
    tok = build_chat_tokenizer()
    return {
        "student": save_chat_model(root / "student", tok, seed=0),
        "teacher": save_chat_model(root / "teacher", tok, seed=1, hidden_size=48),
        "train": write_jsonl(root / "train.jsonl", ROWS * 2),
        "val": write_jsonl(root / "val.jsonl", ROWS[:2]),
        "test": write_jsonl(root / "test.jsonl", ROWS[2:]),
    }
