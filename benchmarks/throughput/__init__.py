"""Seconds per on-policy distillation step: ours (Lightning), TRL, and a bare PyTorch loop.

    python -m benchmarks.throughput                      # all contenders, ~3 minutes on 2 CPU cores (from the repo root)
    python -m benchmarks.throughput --steps 5 --warmup 1 --contenders ours_opd bare   # a quick look
    python -m benchmarks.throughput --profile ours_opd   # cProfile of one contender's steps, alone

Every contender does the same work per step: the same tiny student and teacher (random Llamas built
from config with the arithmetic tokenizer and saved with ``save_pretrained``), a batch of the same
``ArithmeticTask`` train prompts, a rollout of exactly ``--new-tokens`` tokens per prompt sampled
with the KV cache (EOS suppressed with ``min_new_tokens``, so no contender gets shorter rollouts by
luck), one teacher forward without grad, one student forward and backward, reverse KL averaged over
the response positions, one AdamW step (same lr, no weight decay, no gradient clipping).

Each contender runs its real training loop (``Trainer.fit``, ``DistillationTrainer.train``, ...) in
its own process. The processes take turns one step at a time (round-robin, the order rotated every
round): a contender's step is timed from the moment it is let go to the end of its step (everything
its loop does between two steps is inside: fetching the batch, the rollout, scoring, the update,
logging), while the others wait on a pipe and use no CPU. Warm-up steps are dropped; the table gives
medians. Before a ratio is printed, the counts of generated tokens and loss positions that each
contender reported for each step are compared: a contender whose work differs gets no ratio.

The ``arith_*`` contenders measure TRD where it is used instead: the shipped configs
(``configs/arith/{opd,trd_splice,trd_rewrite}.yaml``) with the trained student and teacher, natural
rollout lengths and the configs' own losses, interleaved the same way; their ratio is to the OPD
config, and their work is reported per step rather than forced equal.

Peak memory is each process's maximum resident set size (``getrusage``), so it includes the Python
runtime and the imported libraries (TRL imports more); "+train" is its growth once training started.

The package: `harness` (the pacing, the worker processes, the shared set-up, the models),
`contenders` (what each contender runs, their labels and groups), `report` (the same-work check,
the table, the targets, the markdown) and `cli` (the options; ``python -m benchmarks.throughput``).
`benchmarks/lookahead.py` and `benchmarks/sharded_rollout.py` reuse the harness.
"""
