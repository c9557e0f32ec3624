import math

import pytest
import torch

from trd_lightning.losses import (
    LOSSES,
    TEACHER_FREE,
    compute_loss,
    forward_kl,
    generalized_jsd,
    get_loss,
    reverse_kl,
    sampled_kl_estimate,
    sampled_kl_surrogate,
    topk_reverse_kl,
)

B, T, V = 3, 5, 7
TOL = 1e-5


def make(seed=0, b=B, t=T, v=V, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g) * scale
    q = torch.randn(b, t, v, generator=g) * scale
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[0, 0] = True
    tokens = torch.randint(0, v, (b, t), generator=g)
    return s, q, mask, tokens


# ---- pure-python brute force -------------------------------------------------------------
def lsm(xs, temp=1.0):
    xs = [x / temp for x in xs]
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def kl(la, lb):
    return sum(math.exp(a) * (a - b) for a, b in zip(la, lb))


def bf_mean(s, q, mask, per_pos, clip=None):
    S, Q, M = s.tolist(), q.tolist(), mask.tolist()
    tot, n = 0.0, 0
    for b in range(len(S)):
        for t in range(len(S[0])):
            if M[b][t]:
                v = per_pos(S[b][t], Q[b][t], b, t)
                tot += v if clip is None else min(v, clip)
                n += 1
    return tot / max(n, 1)


def bf_fkl(temp=1.0):
    return lambda s, q, b, t: kl(lsm(q, temp), lsm(s, temp))


def bf_rkl(temp=1.0):
    return lambda s, q, b, t: kl(lsm(s, temp), lsm(q, temp))


def bf_jsd(beta):
    def f(s, q, b, t):
        lp, lq = lsm(s), lsm(q)
        lm = [math.log((1 - beta) * math.exp(a) + beta * math.exp(c)) for a, c in zip(lp, lq)]
        return beta * kl(lq, lm) + (1 - beta) * kl(lp, lm)

    return f


def bf_topk(k, temp=1.0):
    def f(s, q, b, t):
        ids = sorted(range(len(q)), key=lambda i: -q[i])[:k]
        return kl(lsm([s[i] for i in ids], temp), lsm([q[i] for i in ids], temp))

    return f


def bf_est(tokens, est):
    tok = tokens.tolist()

    def f(s, q, b, t):
        y = tok[b][t]
        lp, lq = lsm(s)[y], lsm(q)[y]
        if est == "k1":
            return lp - lq
        r = lq - lp
        return math.exp(r) - 1 - r

    return f


def close(x, y, tol=TOL):
    x = float(x.detach()) if torch.is_tensor(x) else x
    assert abs(x - y) < tol, (x, y)


# ---- correctness vs brute force ----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temp", [1.0, 2.0, 0.7])
def test_forward_reverse_kl(seed, temp):
    s, q, mask, _ = make(seed)
    close(forward_kl(s, q, mask, temperature=temp), bf_mean(s, q, mask, bf_fkl(temp)))
    close(reverse_kl(s, q, mask, temperature=temp), bf_mean(s, q, mask, bf_rkl(temp)))


def test_clip_caps_each_position_and_zeroes_its_grad():
    s, q, mask, _ = make(3)
    vals = sorted(bf_rkl()(a, b, 0, 0) for a, b in zip(s.reshape(-1, V).tolist(), q.reshape(-1, V).tolist()))
    clip = vals[len(vals) // 2]
    s.requires_grad_(True)
    out = reverse_kl(s, q, mask, clip=clip)
    close(out, bf_mean(s.detach(), q, mask, bf_rkl(), clip=clip))
    close(forward_kl(s, q, mask, clip=0.1), bf_mean(s.detach(), q, mask, bf_fkl(), clip=0.1))
    out.backward()
    per = [bf_rkl()(a, b, 0, 0) for a, b in zip(s.detach().reshape(-1, V).tolist(), q.reshape(-1, V).tolist())]
    g = s.grad.reshape(-1, V)
    for i, (v, m) in enumerate(zip(per, mask.reshape(-1).tolist())):
        if v > clip + 1e-6 or not m:
            assert torch.all(g[i] == 0)
        else:
            assert g[i].abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd(beta):
    s, q, mask, _ = make(4)
    out = generalized_jsd(s, q, mask, beta=beta)
    if beta == 0.0:
        close(out, float(forward_kl(s, q, mask)))
    elif beta == 1.0:
        close(out, float(reverse_kl(s, q, mask)))
    else:
        close(out, bf_mean(s, q, mask, bf_jsd(beta)))
    with pytest.raises(ValueError):
        generalized_jsd(s, q, mask, beta=1.5)


@pytest.mark.parametrize("k,temp", [(1, 1.0), (3, 1.0), (4, 1.5), (7, 1.0)])
def test_topk_reverse_kl(k, temp):
    s, q, mask, _ = make(5)
    close(topk_reverse_kl(s, q, mask, k=k, temperature=temp), bf_mean(s, q, mask, bf_topk(k, temp)))
    if k == 1:
        close(topk_reverse_kl(s, q, mask, k=1), 0.0)


def test_topk_k_clamped_to_vocab_equals_full_reverse_kl():
    s, q, mask, _ = make(6)
    close(topk_reverse_kl(s, q, mask, k=1000), float(reverse_kl(s, q, mask)))


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_sampled_estimates_and_surrogate_value(est):
    s, q, mask, tok = make(7)
    close(sampled_kl_estimate(s, q, tok, mask, estimator=est), bf_mean(s, q, mask, bf_est(tok, est)))
    T_ = tok.tolist()

    def sur(sv, qv, b, t):
        return bf_est(tok, est)(sv, qv, b, t) * lsm(sv)[T_[b][t]]

    s.requires_grad_(True)
    out = sampled_kl_surrogate(s, q, tok, mask, estimator=est)
    close(out, bf_mean(s.detach(), q, mask, sur))
    out.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        sampled_kl_estimate(s, q, tok, mask, estimator="k2")


def test_k1_surrogate_expected_gradient_is_exact_reverse_kl_gradient():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    p = [math.exp(x) for x in lsm(s[0, 0].tolist())]
    expected = torch.zeros(3, dtype=torch.float64)
    for y in range(3):
        sy = s.clone().requires_grad_(True)
        sampled_kl_surrogate(sy, q, torch.tensor([[y]]), mask, estimator="k1").backward()
        expected += p[y] * sy.grad[0, 0].double()
    se = s.clone().requires_grad_(True)
    reverse_kl(se, q, mask).backward()
    assert torch.allclose(expected, se.grad[0, 0].double(), atol=1e-5), (expected, se.grad)


# ---- invariances -------------------------------------------------------------------------
def all_losses(s, q, mask, tok):
    out = {n: compute_loss(n, s, q, mask, tokens=tok) for n in LOSSES}
    out["topk3"] = topk_reverse_kl(s, q, mask, k=3)
    out["clip"] = forward_kl(s, q, mask, clip=0.1)
    out["est_k1"] = sampled_kl_estimate(s, q, tok, mask)
    out["est_k3"] = sampled_kl_estimate(s, q, tok, mask, estimator="k3")
    return {k: float(v.detach()) for k, v in out.items()}


def test_masked_positions_do_not_leak():
    s, q, mask, tok = make(9)
    base = all_losses(s, q, mask, tok)
    s2, q2, tok2 = s.clone(), q.clone(), tok.clone()
    off = ~mask
    s2[off] = torch.randn(int(off.sum()), V) * 1e4
    q2[off] = -torch.randn(int(off.sum()), V) * 1e4
    tok2[off] = -100
    s2.requires_grad_(True)
    got = all_losses(s2, q2, mask, tok2)
    for n in base:
        assert abs(base[n] - got[n]) < TOL, n
    compute_loss("reverse_kl", s2, q2, mask).backward()
    assert torch.isfinite(s2.grad).all() and torch.all(s2.grad[off] == 0)


def test_left_vs_right_padding_same_loss():
    g = torch.Generator().manual_seed(10)
    lens = [5, 2, 3]
    sr, qr = torch.randn(3, 5, V, generator=g), torch.randn(3, 5, V, generator=g)
    tr = torch.randint(0, V, (3, 5), generator=g)
    mr = torch.zeros(3, 5, dtype=torch.bool)
    sl, ql, tl, ml = torch.randn(3, 5, V, generator=g) * 50, torch.randn(3, 5, V, generator=g) * 50, tr.clone(), mr.clone()
    for b, n in enumerate(lens):
        mr[b, :n] = True
        ml[b, 5 - n:] = True
        sl[b, 5 - n:], ql[b, 5 - n:], tl[b, 5 - n:] = sr[b, :n], qr[b, :n], tr[b, :n]
    right, left = all_losses(sr, qr, mr, tr), all_losses(sl, ql, ml, tl)
    for n in right:
        assert abs(right[n] - left[n]) < TOL, n


def test_zero_when_student_equals_teacher():
    s, _, mask, tok = make(11)
    for n, v in all_losses(s, s.clone(), mask, tok).items():
        if n not in TEACHER_FREE:  # cross entropy is not a divergence (tests/test_fidelity.py checks it)
            assert abs(v) < TOL, n


def test_gradients_flow_to_student():
    for n in LOSSES:
        s, q, mask, tok = make(12)
        s.requires_grad_(True)
        out = compute_loss(n, s, q, mask, tokens=tok)
        assert out.dim() == 0
        out.backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, n


def test_low_precision_input_computed_in_float32():
    s, q, mask, _ = make(13)
    out = reverse_kl(s.bfloat16(), q.bfloat16(), mask)
    assert out.dtype == torch.float32
    close(out, float(reverse_kl(s.bfloat16().float(), q.bfloat16().float(), mask)))


def test_all_masked_returns_zero():
    s, q, _, tok = make(14)
    assert float(reverse_kl(s, q, torch.zeros(B, T, dtype=torch.bool))) == 0.0


# ---- registry / validation ---------------------------------------------------------------
def test_registry_and_errors():
    assert set(LOSSES) == {"forward_kl", "reverse_kl", "generalized_jsd", "topk_reverse_kl", "k1", "k3", "cross_entropy"}
    assert get_loss("reverse_kl") is reverse_kl
    with pytest.raises(ValueError, match="revers_kl") as e:
        get_loss("revers_kl")
    assert "reverse_kl" in str(e.value)
    s, q, mask, tok = make(15)
    with pytest.raises(ValueError, match="tokens"):
        compute_loss("k1", s, q, mask)
    with pytest.raises((TypeError, ValueError), match="beta"):
        compute_loss("reverse_kl", s, q, mask, beta=0.5)
    close(compute_loss("generalized_jsd", s, q, mask, beta=0.3, tokens=tok), bf_mean(s, q, mask, bf_jsd(0.3)))
    close(compute_loss("topk_reverse_kl", s, q, mask, k=3), bf_mean(s, q, mask, bf_topk(3)))


def test_shape_validation():
    s, q, mask, tok = make(16)
    with pytest.raises(ValueError, match="vocabulary"):
        reverse_kl(s, q[..., :5], mask)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, q, mask[:, :3])
    with pytest.raises(ValueError, match="tokens"):
        sampled_kl_estimate(s, q, tok[:, :2], mask)
