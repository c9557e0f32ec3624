import importlib.util
import math
import pathlib
import sys
from fractions import Fraction

import pytest
import torch

try:
    from trd_lightning.metrics import PassAtK, avg_at_n, pass_at_k
except Exception:  # package __init__ may be mid-edit by someone else; load the file directly
    _path = pathlib.Path(__file__).resolve().parents[1] / "trd_lightning" / "metrics.py"
    _spec = importlib.util.spec_from_file_location("_trd_metrics", _path)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _mod
    _spec.loader.exec_module(_mod)
    PassAtK, avg_at_n, pass_at_k = _mod.PassAtK, _mod.avg_at_n, _mod.pass_at_k


def exact(n, c, k):
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_full_grid_vectorised():
    rows = [(n, c, k) for n in range(1, 21) for c in range(n + 1) for k in range(1, n + 1)]
    for k in range(1, 21):
        sel = [(n, c) for n, c, kk in rows if kk == k]
        n = torch.tensor([r[0] for r in sel])
        c = torch.tensor([r[1] for r in sel])
        got = pass_at_k(n, c, k)
        assert got.dtype == torch.float64
        want = torch.tensor([exact(nn, cc, k) for nn, cc in sel], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_scalars_and_broadcast():
    assert pass_at_k(10, 3, 1).item() == pytest.approx(0.3, abs=1e-12)
    assert pass_at_k(5, 5, 5).item() == 1.0
    assert pass_at_k(5, 0, 3).item() == 0.0
    assert pass_at_k(4, 2, 3).item() == 1.0  # n - c < k
    got = pass_at_k(16, torch.tensor([0, 1, 8, 16]), 4)
    want = torch.tensor([exact(16, c, 4) for c in (0, 1, 8, 16)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_pass_at_k_large_n_against_fractions():
    n = 200
    cs, ks = [0, 1, 2, 5, 50, 100, 150, 190, 199, 200], [1, 2, 10, 50, 100, 200]
    for k in ks:
        got = pass_at_k(n, torch.tensor(cs), k)
        for g, c in zip(got.tolist(), cs):
            want = 1 - Fraction(math.comb(n - c, k), math.comb(n, k)) if n - c >= k else Fraction(1)
            assert g == pytest.approx(float(want), rel=1e-10, abs=1e-300)


def test_pass_at_k_validation():
    with pytest.raises(ValueError, match=r"k=8 .*n=4"):
        pass_at_k(torch.tensor([4, 16]), torch.tensor([1, 1]), 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, -1, 1)
    for bad_k in (0, 1.0, True):
        with pytest.raises(ValueError):
            pass_at_k(4, 1, bad_k)


def test_avg_at_n():
    got = avg_at_n(torch.tensor([4, 8]), torch.tensor([1, 8]))
    assert got.dtype == torch.float64
    assert got.tolist() == [0.25, 1.0]


def test_metric_matches_independent_computation():
    m = PassAtK(ks=(1, 4, 16), num_samples=16)
    data = [(0, 3), (1, 0), (2, 16), (3, 7), (4, 1)]
    m.update(torch.tensor([c for _, c in data[:2]]), 16, torch.tensor([i for i, _ in data[:2]]))
    m.update(torch.tensor([c for _, c in data[2:]]), 16, torch.tensor([i for i, _ in data[2:]]))
    out = m.compute()
    assert list(out) == ["avg@16", "pass@1", "pass@4", "pass@16"]
    assert out["avg@16"].item() == pytest.approx(sum(c / 16 for _, c in data) / len(data), abs=1e-12)
    for k in (1, 4, 16):
        want = sum(exact(16, c, k) for _, c in data) / len(data)
        assert out[f"pass@{k}"].item() == pytest.approx(want, abs=1e-12)


def test_metric_dedups_problem_ids_and_keeps_unlabelled_rows():
    m = PassAtK(ks=(2,))
    m.update(torch.tensor([2, 0]), torch.tensor([4, 4]), torch.tensor([7, 8]))
    m.update(torch.tensor([4, 1, 1]), 4, torch.tensor([7, -1, -1]))  # id 7 repeated: first kept
    want = (exact(4, 2, 2) + exact(4, 0, 2) + 2 * exact(4, 1, 2)) / 4
    assert m.compute()["pass@2"].item() == pytest.approx(want, abs=1e-12)


def test_metric_mixed_n_key_and_compute_time_k_check():
    m = PassAtK(ks=(1,))
    m.update(torch.tensor([1, 2]), torch.tensor([4, 8]))
    assert set(m.compute()) == {"avg", "pass@1"}
    m = PassAtK(ks=(8,))
    m.update(torch.tensor([1]), 4)
    with pytest.raises(ValueError, match=r"k=8 .*n=4"):
        m.compute()


def test_metric_construction_rejects_k_above_num_samples():
    with pytest.raises(ValueError, match=r"k=8 .*n=4"):
        PassAtK(ks=(1, 8), num_samples=4)


def test_metric_reset_and_empty_compute():
    m = PassAtK(ks=(1,), num_samples=16)
    with pytest.warns(UserWarning):
        out = m.compute()
    assert set(out) == {"avg@16", "pass@1"} and all(torch.isnan(v) for v in out.values())
    m.update(torch.tensor([16]), 16, torch.tensor([0]))
    assert m.compute()["pass@1"].item() == 1.0
    m.reset()
    m.update(torch.tensor([0]), 16, torch.tensor([0]))
    assert m.compute()["pass@1"].item() == 0.0


def test_merged_shards_equal_single_process():
    # Two "ranks" as a DistributedSampler would shard 5 problems: rank 1 is padded by
    # repeating problem 0, whose outcome is deterministic per problem here.
    correct = {0: 3, 1: 0, 2: 8, 3: 5, 4: 1}
    shards = [[0, 2, 4], [1, 3, 0]]
    ranks = []
    for shard in shards:
        m = PassAtK(ks=(1, 4), num_samples=8)
        m.update(torch.tensor([correct[i] for i in shard]), 8, torch.tensor(shard))
        ranks.append(m)
    ranks[0].merge_state(ranks[1])
    single = PassAtK(ks=(1, 4), num_samples=8)
    single.update(torch.tensor(list(correct.values())), 8, torch.tensor(list(correct)))
    merged, ref = ranks[0].compute(), single.compute()
    assert merged.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(merged[key], ref[key], rtol=0, atol=1e-12)
