"""Loading and building the models: Hugging Face paths, the built-in tiny models, compatibility.

Everything here runs before any compute is spent, so every failure names the problem and the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).parent / "assets"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def builtin_models() -> list[str]:
    return sorted(f"{BUILTIN_PREFIX}{p.parent.name}/{p.name}" for p in ASSETS.glob("*/*") if (p / "config.json").exists())


def resolve_model_path(name: str | Path) -> Path:
    """``builtin:arith/teacher`` -> the checkpoint shipped in the package; anything else is a path.

    Hub ids are deliberately not resolved: this framework never downloads weights at run time.
    """
    name = str(name)
    if name.startswith(BUILTIN_PREFIX):
        path = ASSETS / name[len(BUILTIN_PREFIX):]
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"unknown built-in model {name!r}; available: {', '.join(builtin_models()) or 'none'}"
            )
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {name!r} does not exist; pass a directory written by save_pretrained "
            f"(config.json + weights), or one of: {', '.join(builtin_models()) or 'none (no built-in models installed)'}"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {name!r} has no config.json; is it a save_pretrained directory?")
    if not any((path / f).exists() for f in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"model path {name!r} holds no weights (looked for {', '.join(_WEIGHT_FILES)}); "
            "save the model with save_pretrained or point to the right directory"
        )
    return path


#: Any one of these makes a directory a tokenizer (fast, sentencepiece, BPE vocab, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "spiece.model", "vocab.txt")


def check_tokenizer_files(name: str | Path, role: str = "model") -> None:
    """transformers 5 returns an almost empty tokenizer (or asks for sentencepiece) for a folder
    without tokenizer files; the errors that follow blame the vocabulary or the chat template."""
    path = resolve_model_path(name)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"the {role} directory {str(name)!r} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the weights with tokenizer.save_pretrained(path)"
        )


def weights_fingerprint(name: str | Path) -> str:
    """Identifies a model's weights cheaply (config.json, weight file names and sizes, and the first
    and last MiB of each): a moved copy of the same folder has the same fingerprint, other weights
    (almost surely) not. Used by ``--ckpt_path`` to honour a re-pointed path."""
    import hashlib

    path = resolve_model_path(name)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")):
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read())
    return digest.hexdigest()


def load_tokenizer(name: str | Path, role: str = "model") -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    check_tokenizer_files(name, role)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        # Padding only ever feeds masked positions, so reusing EOS is safe; say so once.
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {name!r} has neither a pad nor an EOS token; add one and save it again")
        tok.pad_token = tok.eos_token
        tok.init_kwargs["pad_token_was_eos"] = True
        # Python shows a given warning text once per process: once per tokenizer path.
        warnings.warn(
            f"tokenizer at {str(name)!r} has no pad token: padding with its EOS token {tok.eos_token!r} "
            "(padded positions are masked out, so this is safe); save the tokenizer with a pad_token to silence this",
            stacklevel=2,
        )
    tok.padding_side = "left"
    return tok


def load_causal_lm(
    name: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    quantization: dict[str, Any] | None = None,
    trainable: bool = True,
    role: str = "model",
) -> torch.nn.Module:
    """A causal LM from a path; frozen (``eval``, no grad) unless ``trainable``.

    ``from_pretrained`` returns eval mode and Lightning no longer calls ``train()`` for us, so the
    mode is set explicitly here.
    """
    path = resolve_model_path(name)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype, role)
    if quantization:
        from trd_lightning.quantization import bitsandbytes_config

        kwargs.update(bitsandbytes_config(**quantization))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the file and role named
        raise _loading_error(e, name, path, role) from e
    missing = [k for k in info.get("missing_keys", []) if not _tied(model, k)]
    if missing:
        # transformers fills missing weights with random values and only logs it.
        raise ValueError(
            f"the {role} weights in {str(name)!r} do not cover its config.json: {len(missing)} tensors missing "
            f"(e.g. {', '.join(sorted(missing)[:3])}), which would be random; fix num_hidden_layers and the other "
            "sizes in config.json, or save the model again with save_pretrained"
        )
    if quantization:
        from trd_lightning.quantization import probe_quantized_model

        probe_quantized_model(model, 4 if quantization.get("load_in_4bit") else 8)
    if trainable:
        model.train()
    else:
        freeze(model)
    return model


_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def _dtype(dtype: str | torch.dtype, role: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        import difflib

        close = difflib.get_close_matches(str(dtype), _DTYPE_NAMES, n=1)
        raise ValueError(
            f"{role}_dtype: unknown dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return getattr(torch, dtype)


def _tied(model: torch.nn.Module, key: str) -> bool:
    # a tied output embedding is "missing" from the file by design
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def _loading_error(error: Exception, name, path: Path, role: str) -> Exception:
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    weights = [f for f in _WEIGHT_FILES if (path / f).exists()]
    where = f"{str(name)!r} ({', '.join(weights)})" if weights else repr(str(name))
    if "deserializ" in text or "header" in text.lower() or "EOF" in text or "unpickl" in text.lower() or "zip" in text.lower():
        return ValueError(
            f"the {role} weights in {where} are truncated or corrupt ({type(error).__name__}: {first[:120]}); "
            "copy or save the model again (save_pretrained)"
        )
    if "size mismatch" in text or "look at the above report" in text or "mismatched" in text.lower():
        detail = next((line.strip() for line in text.splitlines() if "shape" in line or "size mismatch" in line), first)
        return ValueError(
            f"the {role} weights in {where} do not match its config.json ({detail[:200]}); the config's sizes "
            "(hidden_size, num_hidden_layers, vocab_size, ...) must be those the weights were saved with"
        )
    if isinstance(error, (json.JSONDecodeError,)) or "config.json" in text:
        return ValueError(f"the {role} config.json in {str(name)!r} cannot be read ({first[:160]}); fix or re-save it")
    return type(error)(f"loading the {role} model from {str(name)!r} failed: {first}") if isinstance(error, (ValueError, OSError)) else error


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int | None = None,
) -> LlamaForCausalLM:
    """A Llama-style model from config, sized for CPU tests and the embedded task."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def check_compatible(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Per-token distillation compares distributions index by index: the vocabularies must agree."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise ValueError(
            "student and teacher tokenizers differ: "
            f"sizes {len(s_vocab)} vs {len(t_vocab)}; only in student {only_s}; only in teacher {only_t}; "
            f"different ids for {moved}. Per-token distillation needs one shared vocabulary: "
            "use a teacher from the same model family (same tokenizer) as the student"
        )
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        s, t = getattr(student_tokenizer, attr), getattr(teacher_tokenizer, attr)
        if s != t:
            raise ValueError(f"student and teacher tokenizers disagree on {attr}: {s} vs {t}; save both with the same special tokens")
    s_special, t_special = set(student_tokenizer.all_special_tokens), set(teacher_tokenizer.all_special_tokens)
    if s_special != t_special:
        raise ValueError(
            "student and teacher tokenizers have different special tokens: "
            f"only in student {sorted(s_special - t_special)}, only in teacher {sorted(t_special - s_special)}; "
            "the contexts are tokenized once for both models, so both must treat the same strings as special"
        )
    _check_same_chat_template(student_tokenizer, teacher_tokenizer)


#: Rendered through both chat templates by the pre-flight check.
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a careful mathematician."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. The answer is \\boxed{5}."},
    {"role": "user", "content": "And 4 * 6?"},
)


def _render(tokenizer: PreTrainedTokenizerBase, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception:  # some templates refuse a system turn: that conversation is not compared
        return None


def check_same_rendering(student_tokenizer, teacher_tokenizer, messages, what: str) -> None:
    """Both chat templates must render ``messages`` to the same text: prompts are rendered once
    (by the task, with the student's template) and the teacher reads that same text."""
    s, t = _render(student_tokenizer, messages), _render(teacher_tokenizer, messages)
    if s is None or t is None or s == t:
        return
    i = next((k for k, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
    raise ValueError(
        f"student and teacher chat templates render {what} differently, from character "
        f"{i}: student {s[max(0, i - 20): i + 40]!r} vs teacher {t[max(0, i - 20): i + 40]!r}; use a "
        "teacher from the student's model family or save both tokenizers with the same chat_template"
    )


def _check_same_chat_template(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase) -> None:
    """Prompts are rendered once (by the task) for both models: their templates must agree, with a
    system turn and without one (a template may add a default system turn when none is given)."""
    if not (getattr(student_tokenizer, "chat_template", None) and getattr(teacher_tokenizer, "chat_template", None)):
        return
    check_same_rendering(student_tokenizer, teacher_tokenizer, SAMPLE_CONVERSATION, "a sample conversation")
    check_same_rendering(student_tokenizer, teacher_tokenizer, SAMPLE_CONVERSATION[1:], "a sample conversation without a system turn")


def position_limit(model: torch.nn.Module | None) -> int | None:
    """The longest sequence (prompt + response) a model was built for, if its config says
    (``max_position_embeddings``; GPT-2's ``n_positions`` answers to that name too)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_same_stop_ids(student_stop_ids: list[int], teacher_stop_ids: list[int]) -> None:
    """Student and teacher must end a response at the same tokens: the teacher scores (and, in TRD,
    writes) the student's responses, whose end is decided by one set of stop ids."""
    if set(student_stop_ids) != set(teacher_stop_ids):
        raise ValueError(
            f"student and teacher end responses at different tokens: student stop ids {sorted(student_stop_ids)}, "
            f"teacher stop ids {sorted(teacher_stop_ids)} (generation_config.eos_token_id plus the tokenizer's EOS); "
            "save both generation_config.json files with the same eos_token_id list"
        )


def check_model_matches_tokenizer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and vocab < len(tokenizer):
        raise ValueError(
            f"the {role} model's output vocabulary ({vocab}) is smaller than its tokenizer ({len(tokenizer)}); "
            "resize the embeddings or use the tokenizer the model was trained with"
        )
