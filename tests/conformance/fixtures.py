"""Conformance fixtures: tiny *real* Hugging Face architectures and tokenizers, built in code.

Nothing is downloaded. Every tokenizer is a byte-level BPE trained here on a small in-code corpus
(what Qwen, Llama-3, Mistral-Nemo and GPT-2 ship), every model is a random-weight instance of the
real architecture class, and everything is written with ``save_pretrained`` so the framework
reads it exactly as it reads a hub checkpoint.

Tokenizer layouts (one trained vocabulary for all ChatML layouts, so models can be paired):

* ``chatml``        pad ``<|endoftext|>``, EOS ``<|im_end|>`` (Qwen2.5-Instruct style);
* ``chatml_nopad``  no pad token, EOS ``<|im_end|>`` (the framework pads with EOS, and says so);
* ``chatml_multi``  EOS ``<|endoftext|>`` while turns end with ``<|im_end|>``; the models'
  ``generation_config.eos_token_id`` lists both (Qwen2.5 base / Qwen3 style);
* ``gemma``         its own vocabulary, ``<bos>``/``<eos>``/``<pad>``, turns end with
  ``<end_of_turn>`` (listed with ``<eos>`` in ``generation_config``), Gemma's template;
* ``other``         a different vocabulary (another corpus and size): the mismatch refusal.

Usable from the command line through ``tools/make_conformance_fixtures.py``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers import AutoModelForCausalLM

CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

CHATML_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma's layout: <bos>, a "model" role, no system role (a system turn is folded into the first user turn).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- set ns = namespace(sys='') %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{%- set ns.sys = m['content'] + '\n\n' %}"
    "{%- else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (ns.sys if loop.index0 <= 1 and m['role'] == 'user' else '') + m['content'] }}<end_of_turn>\n"
    "{% endif %}{%- endfor %}{%- if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: The math data: problem / solution / answer, read by `MathTask`.
ROWS = [
    {"problem": "What is 2+3?", "solution": "We add: 2+3=5. So the answer is \\boxed{5}.", "answer": "5"},
    {"problem": "What is 7-4?", "solution": "We subtract: 7-4=3. So the answer is \\boxed{3}.", "answer": "3"},
    {"problem": "What is 3*3?", "solution": "We multiply: 3*3=9. So the answer is \\boxed{9}.", "answer": "9"},
    {"problem": "Halve 1.", "solution": "Half of 1 is 1/2, so the answer is \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}"},
    {"problem": "What is 6/2?", "solution": "We divide: 6/2=3. So the answer is \\boxed{3}.", "answer": "3"},
    {"problem": "What is 4+4?", "solution": "We add: 4+4=8. So the answer is \\boxed{8}.", "answer": "8"},
    {"problem": "What is 9-1?", "solution": "We subtract: 9-1=8. So the answer is \\boxed{8}.", "answer": "8"},
    {"problem": "What is 2*5?", "solution": "We multiply: 2*5=10. So the answer is \\boxed{10}.", "answer": "10"},
]

_CORPUS = [
    *(f"{r['problem']} {r['solution']}" for r in ROWS),
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Here is a math problem and an attempted solution. Rewrite the attempted solution. Keep its structure "
    "and every step that is correct, fix the steps that are wrong and continue correctly from there.",
    "Here is a reference solution to this problem: Using the reference solution as a guide, write your own "
    "complete step-by-step solution. Reference solution: Attempted solution: Problem:",
    "Wait, that is wrong. Actually, let me check again. Hmm. Alternatively, we can count.",
    "system user assistant model You are a careful mathematician.",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) { } . , : ? ! \\frac \\boxed",
]
_OTHER_CORPUS = ["Le renard brun saute par-dessus le chien paresseux.", "Quel est le résultat ? 12 + 30 = 42."] * 3


@lru_cache(maxsize=None)
def _trained_core(special: tuple[str, ...], corpus: tuple[str, ...], vocab_size: int) -> str:
    """A byte-level BPE trained on ``corpus`` (JSON, so every caller gets its own copy)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return core.to_str()


def build_tokenizer(layout: str) -> PreTrainedTokenizerFast:
    """One of the tokenizer layouts above (a real `PreTrainedTokenizerFast`)."""
    if layout == "gemma":
        core = Tokenizer.from_str(_trained_core(tuple(GEMMA_SPECIAL), tuple(_CORPUS), 420))
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], model_max_length=512,
        )
        tok.chat_template = GEMMA_TEMPLATE
        return tok
    if layout == "other":
        core = Tokenizer.from_str(_trained_core(tuple(CHATML_SPECIAL), tuple(_OTHER_CORPUS), 300))
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>"], model_max_length=512)
        tok.chat_template = CHATML_TEMPLATE
        return tok
    core = Tokenizer.from_str(_trained_core(tuple(CHATML_SPECIAL), tuple(_CORPUS), 400))
    roles = {
        "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]},
        "chatml_nopad": {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|endoftext|>"]},
        "chatml_multi": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    }
    if layout not in roles:
        raise ValueError(f"unknown tokenizer layout {layout!r}; choose one of {[*roles, 'gemma', 'other']}")
    # unk named explicitly: some tokenizer classes (Qwen2's) fill in a default when it is absent.
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=512, unk_token="<|endoftext|>", **roles[layout])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def stop_ids(tokenizer, layout: str) -> list[int]:
    """The ids a model of this layout stops at (what its ``generation_config.eos_token_id`` lists)."""
    if layout == "chatml_multi":
        return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    if layout == "gemma":
        return [tokenizer.convert_tokens_to_ids("<eos>"), tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    return [tokenizer.eos_token_id]


#: Architectures: a real config class each; ``dropout`` > 0 where noted. ``width`` is the hidden size.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma")


def build_config(arch: str, tokenizer, *, width: int = 32, layers: int = 2, positions: int = 512, dropout: float = 0.0, layout: str = "chatml"):
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  eos_token_id=stop_ids(tokenizer, layout), bos_token_id=tokenizer.bos_token_id)
    heads = 2
    llama_like = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=1, max_position_embeddings=positions, attention_dropout=dropout, **common)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, **llama_like)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **llama_like)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, head_dim=width // heads, **llama_like)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=None, **llama_like)
    if arch == "gemma":  # tied embeddings, GeGLU, embeddings scaled by sqrt(hidden)
        return GemmaConfig(tie_word_embeddings=True, head_dim=width // heads, **llama_like)
    if arch == "gpt2":  # Conv1D layers, absolute positions capped at n_positions
        return GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=positions, resid_pdrop=dropout,
                          embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=True, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def save_model(path, arch: str, layout: str, *, seed: int, width: int = 32, layers: int = 2, positions: int = 512,
               dropout: float = 0.0, with_tokenizer: bool = True) -> str:
    """A random-weight ``arch`` model for tokenizer ``layout``, saved like a hub checkpoint."""
    tok = build_tokenizer(layout)
    config = build_config(arch, tok, width=width, layers=layers, positions=positions, dropout=dropout, layout=layout)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # What real checkpoints ship: the stop set in generation_config.json.
    model.generation_config = GenerationConfig(eos_token_id=stop_ids(tok, layout), pad_token_id=config.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows=ROWS) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_data(root) -> dict[str, str]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {"train": write_jsonl(root / "train.jsonl", ROWS), "val": write_jsonl(root / "val.jsonl", ROWS[:2]),
            "test": write_jsonl(root / "test.jsonl", ROWS[2:5])}


#: The model pairs the matrix uses: name -> (student arch, teacher arch, layout, student kwargs, teacher kwargs).
PAIRS = {
    "llama-qwen2": ("llama", "qwen2", "chatml", {}, {"width": 48}),
    "qwen3-mistral": ("qwen3", "mistral", "chatml", {}, {"width": 48}),
    "gpt2-llama": ("gpt2", "llama", "chatml_nopad", {"dropout": 0.1, "positions": 512}, {"width": 48}),
    "qwen2-qwen3-multi": ("qwen2", "qwen3", "chatml_multi", {}, {"width": 48}),
    "gemma-gemma": ("gemma", "gemma", "gemma", {}, {"width": 48}),
}


def write_pair(root, name: str) -> dict[str, str]:
    """``{"student": dir, "teacher": dir}`` of pair ``name`` under ``root/name``."""
    s_arch, t_arch, layout, s_kw, t_kw = PAIRS[name]
    root = Path(root) / name
    return {"student": save_model(root / "student", s_arch, layout, seed=0, **s_kw),
            "teacher": save_model(root / "teacher", t_arch, layout, seed=1, **t_kw), "layout": layout}


def write_all(root) -> dict:
    """Every pair, the data files and the other-vocabulary teacher under ``root``."""
    root = Path(root)
    out = {name: write_pair(root, name) for name in PAIRS}
    out["other_vocab_teacher"] = save_model(root / "other_vocab" / "teacher", "llama", "other", seed=2)
    out["data"] = write_data(root / "data")
    return out
