"""Write the conformance fixtures to a folder: tiny random-weight real architectures with trained
byte-level BPE tokenizers, and a small math jsonl, so the commands of docs/real_models.md can be
run for real (they stand in for a locally saved model pair and your own data).

    python tools/make_conformance_fixtures.py OUT            # every pair (see tests/conformance/fixtures.py)
    python tools/make_conformance_fixtures.py OUT --pair llama-qwen2

Writes OUT/<pair>/{student,teacher}/ (save_pretrained: config, weights, generation_config,
tokenizer) and OUT/data/{train,val,test}.jsonl, and prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone: the fixtures live in tests/

from tests.conformance.fixtures import PAIRS, write_all, write_data, write_pair  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--pair", choices=sorted(PAIRS), help="write one model pair only (default: all, plus the other-vocabulary teacher)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pair:
        written = {args.pair: write_pair(args.out, args.pair), "data": write_data(args.out / "data")}
    else:
        written = write_all(args.out)
    print(json.dumps(written, indent=2))
    return written


if __name__ == "__main__":
    main()
