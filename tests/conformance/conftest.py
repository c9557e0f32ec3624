"""Session fixtures of the conformance suite: every model pair, tokenizer layout and data file,
written once per test session with ``save_pretrained`` (see `tests.conformance.fixtures`)."""

from __future__ import annotations

import pytest

from tests.conformance.fixtures import write_all


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """``{pair: {"student", "teacher", "layout"}, "data": {...}, "other_vocab_teacher": dir}``."""
    return write_all(tmp_path_factory.mktemp("conformance"))
