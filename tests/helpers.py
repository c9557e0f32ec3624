"""Helpers shared by the tests: tiny models, tokenizers and trainers built in code (nothing is
downloaded), the math path's chat fixtures, the engine checks, and the scaffolding of tests that
run ``trd fit`` (or a program of their own) in a subprocess. Pytest fixtures stay in conftest.py.

Two files stay separate because a subprocess runs or loads them: ``tests/fsdp_fit.py`` is a program
(``python -m tests.fsdp_fit``, re-run by Lightning on every rank) and ``tests/splice_fit.py`` holds
the `RolloutCheck` callback that the multi-process ``trd fit`` runs load from their YAML overlay.
"""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trd_lightning.engines.base import sampling_law
from trd_lightning.models import build_tiny_causal_lm
from trd_lightning.rollout import Sampling, encode_prompts

ROOT = Path(__file__).resolve().parents[1]

# --- tiny models and trainers ------------------------------------------------------------------
#: A `trd fit -c configs/arith/opd.yaml` small enough for an end-to-end test (3 steps, 16 test problems).
SMALL_ARITH_RUN = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16",
    "--data.init_args.task.init_args.val_size=16",
    "--data.init_args.task.init_args.test_size=16",
]
#: What PassAtKEvaluation(n=16, ks=[1, 8]) logs on the arithmetic test split (with derivation coverage).
ARITH_TEST_KEYS = {"test/avg@16", "test/pass@1", "test/pass@8", "test/derivations", "test/derivation_coverage", "test/derivations_available"}


def save_tiny(path, tokenizer, seed: int, hidden_size: int = 32, num_layers: int = 2):
    model = build_tiny_causal_lm(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=2, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def cpu_trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


# --- the math path: a tiny chat tokenizer and models built in code, and jsonl files ------------
# The tokenizer is character-level with Qwen-style special tokens and a Jinja ``chat_template``: a
# real `PreTrainedTokenizerFast`, saved and loaded like a hub tokenizer, standing in for Qwen3's.
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
_CHARS = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*_SPECIAL, *_CHARS))}
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


# --- engine checks (test_engines.py, and test_engines_vllm.py in the vLLM venv) ----------------
def first_token_law_gap(engine, model, tokenizer, prompt: str, sampling: Sampling, n: int, seed: int = 0) -> tuple[float, float]:
    """Total variation between the engine's empirical first-token distribution (``n`` samples of one
    prompt) and `sampling_law` of the model's logits; and the gap a correct sampler would show
    at this ``n`` (about sqrt(V / n), the bound the caller compares with)."""
    ids, mask = encode_prompts(tokenizer, [prompt], "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    law = sampling_law(logits, sampling)
    torch.manual_seed(seed)
    out, _ = engine.generate(model, tokenizer, ids, mask, Sampling(**{**vars(sampling), "max_new_tokens": 1}), num_return_sequences=n)
    counts = torch.bincount(out[:, 0], minlength=law.numel()).float()
    tv = 0.5 * (counts / n - law).abs().sum().item()
    support = int((law > 0).sum())
    return tv, (support / n) ** 0.5


def hf_continuation_logprobs(model, sequences: list[list[int]], start: int) -> torch.Tensor:
    """Hugging Face's log-probability of each token of ``sequences[i][start:]`` (one length)."""
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[:, start - 1:]


# --- subprocess runs ---------------------------------------------------------------------------
# Left behind by an earlier in-process distributed run; each launch must choose its own.
_DIST_VARS = ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_isolated(command: list[str], cwd, timeout: float, what: str, tail: int = 5000) -> str:
    """Run ``command`` from this checkout (its root first on PYTHONPATH, one OpenMP thread) in its
    own process group, so that a hang is killed whole, every rank included, and fails the test
    (naming ``what``) instead of blocking CI; returns its stderr, asserts it exited 0."""
    import pytest

    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-tail:]
    return err


class PauseForSignal(Callback):
    """After training step ``step``, write ``marker`` and wait (at most ``timeout`` s) for a SIGTERM.

    Lets the parent test send a real SIGTERM at a known step instead of racing the child's speed.
    """

    def __init__(self, step: int, marker: str, timeout: float = 120.0):
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)
