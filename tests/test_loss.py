"""eksft_loss and eksft_loss_lean against a naive full-vocabulary reference written from the
method's description, and against each other.

The reference below loops over sequences and tokens in float64 and never looks at eksft.py's
internals: for every response token it takes the logit row that predicts it (logits[:, t] predicts
labels[:, t+1]), computes H and KL from full softmaxes, ranks with Python's sorted() (ties: earlier
position first), and builds the loss from plain sums. The grid of options runs both losses against
it; the other checks run the lean one (the loop's), and section 8 holds the plain one equal to the
lean one for every option. Run: python -m pytest tests/test_loss.py -q
"""
import functools
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from eksft import eksft_loss, eksft_loss_lean, selection_slots

IGNORE = -100

# ----------------------------------------------------------------------------
# the naive reference


def slots(ratio, n):
    """k = floor(ratio * n) with ratio read as the decimal it was written as (0.29 * 100 = 29)."""
    return math.floor(Fraction(str(ratio)) * n)


def pick(rows, score, k, largest, gap_check=True):
    """The k rows with the largest (or smallest) score; ties go to the earlier row.

    rows are (b, t) in batch-then-position order. With gap_check, refuse data where the k-th and
    (k+1)-th scores are so close that float32 vs float64 statistics could rank them differently."""
    order = sorted(range(len(rows)), key=lambda i: (-score[rows[i]] if largest else score[rows[i]], i))
    if gap_check and 0 < k < len(rows):
        a, b = score[rows[order[k - 1]]], score[rows[order[k]]]
        assert a == b or abs(a - b) > 1e-5 * max(1.0, abs(a)), "test data has a near tie"
    return {rows[i] for i in order[:k]}


def reference_loss(logits, labels, ref_logits=None, ratio=0.2, combine="union", lambda_entropy=0.05,
                   lambda_kl=0.05, scope="sequence", select_largest_entropy=True,
                   select_largest_kl=True, kl_threshold=1e-3, ignore_index=IGNORE,
                   ce_normalizer=None, reg_normalizer=None, gap_check=True):
    """Returns (loss, stats, E, K) with E, K sets of logit rows (b, t); loss is differentiable."""
    B, T, V = logits.shape
    rows = [(b, t) for b in range(B) for t in range(T - 1) if int(labels[b, t + 1]) != ignore_index]
    logp, H, KL = {}, {}, {}
    for (b, t) in rows:
        lp = torch.log_softmax(logits[b, t].double(), dim=0)
        logp[(b, t)] = lp
        H[(b, t)] = -(lp.exp() * lp).sum()
        if ref_logits is not None:
            lq = torch.log_softmax(ref_logits[b, t].double(), dim=0)
            KL[(b, t)] = (lp.exp() * (lp - lq)).sum()
    h = {r: float(H[r].detach()) for r in rows}                   # detached, for selection only
    d = {r: float(KL[r].detach()) for r in KL}

    groups = [[r for r in rows if r[0] == b] for b in range(B)] if scope == "sequence" else [rows]
    E, K = set(), set()
    for g in groups:
        k = slots(ratio, len(g))
        E |= pick(g, h, k, select_largest_entropy, gap_check)
        if ref_logits is not None:
            candidates = [r for r in g if d[r] > kl_threshold]
            K |= pick(candidates, d, k, select_largest_kl, gap_check)
    M = (E | K) if combine == "union" else (E & K)
    kept = [r for r in rows if r not in M]

    zero = torch.zeros((), dtype=torch.float64)
    ce_sum = sum((-logp[(b, t)][int(labels[b, t + 1])] for (b, t) in kept), zero)
    ce = ce_sum / (ce_normalizer if ce_normalizer is not None else max(len(kept), 1))
    ent = zero
    if E:
        ent = sum((H[r] / math.log(V) for r in sorted(E)), zero)
        ent = ent / (reg_normalizer if reg_normalizer is not None else len(E))
    kl = zero
    if K:
        kl = sum((KL[r] for r in sorted(K)), zero)
        kl = kl / (reg_normalizer if reg_normalizer is not None else len(K))
    loss = ce - lambda_entropy * ent + lambda_kl * kl

    n = len(rows)
    stats = {
        "ce": float(ce.detach()), "ent_reg": float(ent.detach()), "kl_reg": float(kl.detach()),
        "entropy": sum(h.values()) / max(n, 1), "kl": (sum(d.values()) / max(n, 1)) if KL else None,
        "masked_frac": len(M) / max(n, 1), "masked_entropy_frac": len(E) / max(n, 1),
        "masked_kl_frac": len(K) / max(n, 1),
        "iou": len(E & K) / len(E | K) if (E | K) else 0.0,
        "n_response": n, "n_kept": len(kept), "n_masked": len(M), "n_entropy": len(E),
        "n_kl": len(K), "n_both": len(E & K), "n_either": len(E | K),
    }
    return loss, stats, E, K


def rows_of(mask):
    """Set of (b, t) where a (B, T-1) boolean mask is True."""
    return {(int(b), int(t)) for b, t in mask.nonzero().tolist()}


# ----------------------------------------------------------------------------
# test data: ragged sequences with prompt, padding and a hole in the middle


def make_batch(seed=0, B=3, T=14, V=11, dtype=torch.float64, spread=3.0):
    """Random logits with moderately peaked rows and a reference that differs on most rows.

    Sequence 0: prompt 3, response 11 (no padding); sequence 1: prompt 2, response 7, padding 5;
    sequence 2: prompt 4, response at 4..9 with 6 ignored (5 tokens, a multi-turn hole), padding 4.
    About a third of the reference rows equal the policy rows (KL exactly 0, below the threshold)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * spread
    ref = logits + torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5
    same = torch.rand(B, T, generator=g) < 0.33
    ref[same] = logits[same]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE
    labels[1, :2] = IGNORE
    labels[1, 9:] = IGNORE
    labels[2, :4] = IGNORE
    labels[2, 6] = IGNORE
    labels[2, 10:] = IGNORE
    return logits.to(dtype), labels, ref.to(dtype)


def check_stats(stats, ref_stats, rtol=1e-5, atol=1e-6, check_regs=True):
    for key in ("n_response", "n_kept", "n_masked", "n_entropy", "n_kl", "n_both", "n_either"):
        assert int(stats[key]) == ref_stats[key], key
    keys = ["ce", "entropy", "masked_frac", "masked_entropy_frac", "masked_kl_frac", "iou"]
    keys += ["ent_reg", "kl_reg"] if check_regs else []
    keys += ["kl"] if ref_stats["kl"] is not None else []
    for key in keys:
        assert stats[key].dim() == 0 and not stats[key].requires_grad, key
        assert math.isclose(float(stats[key]), ref_stats[key], rel_tol=rtol, abs_tol=atol), \
            (key, float(stats[key]), ref_stats[key])


# ----------------------------------------------------------------------------
# 1. values, gradients, masks and stats against the reference over a grid of options

GRID = list(itertools.product(
    [0.0, 0.2, 0.5],                        # ratio
    ["union", "intersection"],              # combine
    ["sequence", "batch"],                  # scope
    [True, False],                          # select_largest_entropy
    [True, False],                          # select_largest_kl
    [(0.0, 0.0), (0.3, 0.7)],               # (lambda_entropy, lambda_kl)
    [False, True],                          # given normalisers
))


LOSSES = {"plain": eksft_loss, "lean": functools.partial(eksft_loss_lean, chunk_size=3)}


@pytest.mark.parametrize("ratio,combine,scope,large_e,large_k,lambdas,normalise", GRID)
@pytest.mark.parametrize("which", LOSSES)
def test_matches_reference(which, ratio, combine, scope, large_e, large_k, lambdas, normalise):
    logits, labels, ref = make_batch(seed=1)
    lam_e, lam_k = lambdas
    opts = dict(ratio=ratio, combine=combine, lambda_entropy=lam_e, lambda_kl=lam_k, scope=scope,
                select_largest_entropy=large_e, select_largest_kl=large_k, kl_threshold=1e-3,
                ce_normalizer=23.0 if normalise else None, reg_normalizer=5 if normalise else None)

    x = logits.clone().requires_grad_(True)
    loss, stats = LOSSES[which](x, labels, ref, return_masks=True, **opts)
    loss.backward()

    y = logits.clone().requires_grad_(True)
    ref_loss, ref_stats, E, K = reference_loss(y, labels, ref, **opts)
    ref_loss.backward()

    assert torch.isfinite(loss)
    assert math.isclose(float(loss.detach()), float(ref_loss.detach()), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    assert rows_of(stats["by_entropy"]) == E
    assert rows_of(stats["by_kl"]) == K
    assert stats["by_entropy"].shape == labels[:, 1:].shape == stats["by_kl"].shape
    assert stats["by_entropy"].dtype == torch.bool
    # ent_reg / kl_reg are compared only where their lambda is nonzero (see test_regulariser_stats)
    check_stats(stats, ref_stats, check_regs=False)
    if lam_e != 0:
        assert math.isclose(float(stats["ent_reg"]), ref_stats["ent_reg"], rel_tol=1e-5, abs_tol=1e-7)
    if lam_k != 0:
        assert math.isclose(float(stats["kl_reg"]), ref_stats["kl_reg"], rel_tol=1e-5, abs_tol=1e-7)


def test_grid_data_exercises_selection():
    """The grid's batch is not degenerate: E and K overlap without being equal, the KL threshold
    removes some response rows from K's candidates, and each sequence gets its own k."""
    logits, labels, ref = make_batch(seed=1)
    _, st, E, K = reference_loss(logits, labels, ref, ratio=0.5)
    assert E & K and E != K and st["n_response"] == 23
    _, st_all, _, _ = reference_loss(logits, labels, ref, ratio=1.0)
    assert 0 < st_all["n_kl"] < st_all["n_response"]          # some rows have KL == 0 exactly
    assert [slots(0.2, n) for n in (11, 7, 5)] == [2, 1, 1] and slots(0.2, 23) == 4


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_random_seeds(seed, dtype):
    """The released recipe's settings on other data, in float32 and float64."""
    logits, labels, ref = make_batch(seed=10 + seed, B=4, T=20, V=17, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, ref, ratio=0.3, chunk_size=5)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    ref_loss, ref_stats, _, _ = reference_loss(y, labels, ref, ratio=0.3)
    ref_loss.backward()
    assert math.isclose(float(loss.detach()), float(ref_loss.detach()), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad.double(), rtol=1e-5, atol=1e-6)
    check_stats(stats, ref_stats)


def test_chunk_size_does_not_matter():
    logits, labels, ref = make_batch(seed=2)
    results = []
    for chunk in (1, 2, 3, 7, 1024):
        x = logits.clone().requires_grad_(True)
        loss, stats = eksft_loss_lean(x, labels, ref, ratio=0.5, chunk_size=chunk, return_masks=True)
        loss.backward()
        results.append((loss.detach(), x.grad, stats["by_entropy"], stats["by_kl"]))
    for loss, grad, e, k in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)
        assert torch.equal(e, results[0][2]) and torch.equal(k, results[0][3])


def test_custom_ignore_index():
    logits, labels, ref = make_batch(seed=3)
    labels = labels.masked_fill(labels == IGNORE, -1)
    x = logits.clone().requires_grad_(True)
    loss, _ = eksft_loss_lean(x, labels, ref, ratio=0.2, ignore_index=-1, chunk_size=3)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    ref_loss, _, _, _ = reference_loss(y, labels, ref, ratio=0.2, ignore_index=-1)
    ref_loss.backward()
    assert math.isclose(float(loss.detach()), float(ref_loss.detach()), rel_tol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# 2. alignment: the masked token is the target of the uncertain row


def peaked_case(T=8, V=6, flat_row=4):
    """One sequence: prompt at 0..1, response at 2..T-1. Every logit row puts +8 on the token it
    predicts (labels[t+1]) except row flat_row, which is nearly uniform (entropy close to log V)."""
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, 4, 0, 5, 2]])
    logits = torch.zeros(1, T, V, dtype=torch.float64)
    for t in range(T - 1):
        target = int(labels[0, t + 1])
        if target != IGNORE:
            logits[0, t, target] = 8.0 + 0.1 * t       # distinct entropies, no ties
    logits[0, flat_row] = torch.tensor([0.01 * v for v in range(V)], dtype=torch.float64)
    return logits, labels


def test_alignment_masks_the_target_of_the_uncertain_row():
    logits, labels = peaked_case()
    flat = 4
    x = logits.clone().requires_grad_(True)
    # 6 response tokens, ratio 0.2 -> k = 1; reference == policy -> K empty
    loss, stats = eksft_loss_lean(x, labels, logits.clone(), ratio=0.2, lambda_entropy=0.0, lambda_kl=0.0,
                             return_masks=True)
    loss.backward()
    by_e = stats["by_entropy"]                          # aligned with labels[:, 1:]
    assert by_e.shape == (1, 7)
    assert by_e[0].nonzero().flatten().tolist() == [flat]   # index 4 of labels[:, 1:] = labels[:, 5]
    assert int(stats["n_kl"]) == 0 and int(stats["n_masked"]) == 1
    # the masked token is labels[0, flat + 1]: the CE is the mean over the other five targets
    lp = torch.log_softmax(logits[0], -1)
    kept = [t for t in range(1, 7) if t != flat]
    expected = -sum(lp[t, labels[0, t + 1]] for t in kept) / len(kept)
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5, abs_tol=1e-7)  # CE is fp32 inside
    # no gradient at the masked row, a CE gradient at the row before it (it is not masked)
    assert torch.count_nonzero(x.grad[0, flat]) == 0
    assert torch.count_nonzero(x.grad[0, flat - 1]) > 0
    assert not by_e[0, flat - 1]
    # rows that predict an ignored label (prompt) and the last row get nothing
    assert torch.count_nonzero(x.grad[0, 0]) == 0 and torch.count_nonzero(x.grad[0, 7]) == 0


def test_alignment_entropy_bonus_lands_on_the_uncertain_row():
    """With lambda_entropy the only gradient on the masked row is -lambda * dH/dz / log V."""
    logits, labels = peaked_case()
    flat, lam = 4, 0.5
    x = logits.clone().requires_grad_(True)
    loss, _ = eksft_loss_lean(x, labels, logits.clone(), ratio=0.2, lambda_entropy=lam, lambda_kl=0.0)
    loss.backward()
    z = logits[0, flat].clone().requires_grad_(True)
    lp = torch.log_softmax(z, -1)
    (-lam * -(lp.exp() * lp).sum() / math.log(logits.shape[-1])).backward()
    torch.testing.assert_close(x.grad[0, flat], z.grad, rtol=1e-5, atol=1e-7)


def test_alignment_with_prompt_boundary():
    """The first response token is predicted by the last prompt row; making that row the uncertain
    one must mask labels[:, 2] (the first response label) and zero the gradient of row 1."""
    logits, labels = peaked_case(flat_row=1)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, logits.clone(), ratio=0.2, lambda_entropy=0.0, lambda_kl=0.0,
                             return_masks=True)
    loss.backward()
    assert stats["by_entropy"][0].nonzero().flatten().tolist() == [1]
    assert torch.count_nonzero(x.grad[0, 1]) == 0
    assert torch.count_nonzero(x.grad[0, 2]) > 0


# ----------------------------------------------------------------------------
# 2b. DFT: each token's CE weighted by its own probability, the weight detached


def naive_dft(logits, labels, normalizer=None):
    """sum over response tokens of sg(p_t) * (-log p_t), p_t = softmax(logits[b, t])[labels[b, t+1]],
    divided by the number of response tokens (or normalizer); float64, one row at a time."""
    total, n = torch.zeros((), dtype=torch.float64), 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            log_p = torch.log_softmax(logits[b, t].double(), dim=0)[target]
            total = total + log_p.exp().detach() * -log_p      # the weight carries no gradient
            n += 1
    return total / (normalizer if normalizer is not None else max(n, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalizer,chunk_size", [(None, 1024), (40.0, 3)])
def test_dft_matches_a_naive_computation(dtype, normalizer, chunk_size):
    logits, labels, _ = make_batch(seed=7, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0,
                             dft=True, ce_normalizer=normalizer, chunk_size=chunk_size)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    expected = naive_dft(y, labels, normalizer)
    expected.backward()
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5, abs_tol=1e-7)
    torch.testing.assert_close(x.grad.double(), y.grad.double(), rtol=1e-5, atol=1e-7)
    # with teeth: the weights matter (plain CE differs), and a weight with gradient would differ
    plain, _ = eksft_loss_lean(logits, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
    assert abs(float(plain) - float(loss.detach())) > 0.1
    z = logits.clone().double().requires_grad_(True)
    log_p = torch.log_softmax(z[:, :-1], -1).gather(2, labels[:, 1:].clamp(0)[..., None])[..., 0]
    undetached = -(log_p.exp() * log_p)[labels[:, 1:] != IGNORE].sum() / (normalizer or 23)
    undetached.backward()
    assert (z.grad - y.grad.double()).abs().max() > 1e-3
    assert int(stats["n_kept"]) == int(stats["n_response"]) == 23


def test_dft_with_selection_weights_only_the_kept_tokens():
    """dft combines with the EKSFT selection: the kept tokens' CE weighted by p, the regularisers
    as before (the naive reference with each kept CE weighted by its detached probability)."""
    logits, labels, ref = make_batch(seed=1)
    opts = dict(ratio=0.3, lambda_entropy=0.2, lambda_kl=0.3)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, ref, dft=True, chunk_size=4, return_masks=True, **opts)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    plain_ref, ref_stats, E, K = reference_loss(y, labels, ref, **opts)
    kept = ~(stats["by_entropy"] | stats["by_kl"]) & (labels[:, 1:] != IGNORE)
    log_p = torch.log_softmax(y[:, :-1].double(), -1).gather(2, labels[:, 1:].clamp(0)[..., None])
    log_p = log_p[..., 0][kept]                                        # (n_kept,)
    ce_plain = -log_p.sum() / len(log_p)
    ce_dft = -(log_p.exp().detach() * log_p).sum() / len(log_p)
    expected = plain_ref - ce_plain + ce_dft                 # the same regularisers, DFT's CE term
    expected.backward()
    assert rows_of(stats["by_entropy"]) == E and rows_of(stats["by_kl"]) == K and E | K
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-5, abs_tol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# 3. ratio 0 and lambdas 0 is plain SFT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_sft_equals_cross_entropy(dtype):
    logits, labels, _ = make_batch(seed=4, dtype=dtype)
    if dtype == torch.float64:
        logits = logits.float().double()   # eksft computes CE in float32; compare on fp32-exact inputs
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
    loss.backward()
    y = logits.float().clone().requires_grad_(True)
    expected = F.cross_entropy(y[:, :-1].reshape(-1, y.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
    expected.backward()
    torch.testing.assert_close(loss.float(), expected.detach(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x.grad.float(), y.grad, rtol=1e-6, atol=1e-7)
    assert int(stats["n_masked"]) == 0 and int(stats["n_kept"]) == int(stats["n_response"])


def test_plain_sft_is_bit_exact():
    """The spec asks for exact equality with F.cross_entropy (token mean) when ratio = 0 and the
    lambdas are 0. Gathering the kept rows and dividing a sum by their count rounds differently
    from F.cross_entropy's mean in about half of random float32 batches (1-3 ulp); this batch
    is one of them. The gradients are bit-equal."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 64, 50
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :5] = IGNORE
    labels[1, 40:] = IGNORE
    loss, _ = eksft_loss_lean(logits, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
    assert torch.equal(loss, expected), (loss.item(), expected.item())


def test_ref_logits_required_when_selecting():
    logits, labels, _ = make_batch(seed=4)
    with pytest.raises(ValueError):
        eksft_loss_lean(logits, labels, None, ratio=0.2)


# ----------------------------------------------------------------------------
# 4. union / intersection counts from hand-made entropy and KL; the KL threshold


def hand_case(kl_rows=(2, 3, 4), n=10, V=4):
    """One sequence with n response tokens (no prompt). Row i (predicting labels[i+1]) has logits
    a_i on token 0 and 0 elsewhere: rows 0, 1, 2 are nearly flat (a = 0.1, 0.2, 0.3; the three
    highest entropies), the others peaked (a = 3, 3.5, ...). The reference adds 3 + i to token 1 on
    kl_rows only; elsewhere it equals the policy (KL exactly 0)."""
    a = [0.1, 0.2, 0.3] + [3.0 + 0.5 * i for i in range(n - 3)]
    logits = torch.zeros(1, n + 1, V, dtype=torch.float64)
    logits[0, :n, 0] = torch.tensor(a, dtype=torch.float64)
    ref = logits.clone()
    for i in kl_rows:
        ref[0, i, 1] += 3.0 + i
    labels = torch.tensor([[IGNORE] + [(i % (V - 1)) + 1 for i in range(n)]])
    return logits, labels, ref


@pytest.mark.parametrize("kl_rows,combine,expect", [
    # ratio 0.3 of 10 -> k = 3; E = {0, 1, 2}
    ((2, 3, 4), "union", dict(n_entropy=3, n_kl=3, n_both=1, n_either=5, n_masked=5, iou=1 / 5)),
    ((2, 3, 4), "intersection", dict(n_entropy=3, n_kl=3, n_both=1, n_either=5, n_masked=1, iou=1 / 5)),
    ((0, 1, 2), "union", dict(n_entropy=3, n_kl=3, n_both=3, n_either=3, n_masked=3, iou=1.0)),
    ((0, 1, 2), "intersection", dict(n_entropy=3, n_kl=3, n_both=3, n_either=3, n_masked=3, iou=1.0)),
    ((7, 8, 9), "union", dict(n_entropy=3, n_kl=3, n_both=0, n_either=6, n_masked=6, iou=0.0)),
    ((7, 8, 9), "intersection", dict(n_entropy=3, n_kl=3, n_both=0, n_either=6, n_masked=0, iou=0.0)),
    # only one token above the threshold: K has 1 member although k = 3
    ((5,), "union", dict(n_entropy=3, n_kl=1, n_both=0, n_either=4, n_masked=4, iou=0.0)),
    # more KL candidates than k: the top 3 by KL (ref shift 3 + i grows with i) = {6, 7, 8}
    ((1, 4, 6, 7, 8), "union", dict(n_entropy=3, n_kl=3, n_both=0, n_either=6, n_masked=6, iou=0.0)),
])
def test_union_intersection_counts(kl_rows, combine, expect):
    logits, labels, ref = hand_case(kl_rows)
    loss, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, combine=combine, return_masks=True)
    assert rows_of(stats["by_entropy"]) == {(0, 0), (0, 1), (0, 2)}
    for key, value in expect.items():
        assert math.isclose(float(stats[key]), value, abs_tol=1e-7), (key, float(stats[key]), value)
    assert int(stats["n_kept"]) == 10 - expect["n_masked"]
    assert math.isclose(float(stats["masked_frac"]), expect["n_masked"] / 10, abs_tol=1e-7)
    assert torch.isfinite(loss)


def test_kl_threshold_is_configurable():
    logits, labels, ref = hand_case((2, 3, 4))
    kls = {}
    for i in (2, 3, 4):
        lp, lq = torch.log_softmax(logits[0, i], -1), torch.log_softmax(ref[0, i], -1)
        kls[i] = float((lp.exp() * (lp - lq)).sum())
    low, mid, _ = sorted(kls.values())
    assert mid - low > 1e-2
    _, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, kl_threshold=(low + mid) / 2, return_masks=True)
    assert rows_of(stats["by_kl"]) == {(0, i) for i in (2, 3, 4) if kls[i] > low}
    _, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, kl_threshold=1e9, return_masks=True)
    assert int(stats["n_kl"]) == 0


def test_entropy_threshold_is_configurable():
    """entropy_threshold works like kl_threshold: only tokens with H > threshold (computed here by
    hand) can be chosen by entropy, None changes nothing, and inf leaves only the KL selection."""
    logits, labels, ref = hand_case((2, 3, 4))
    lp = torch.log_softmax(logits[0, :10], -1)
    ents = -(lp.exp() * lp).sum(-1)                               # H of rows 0..9
    second, third = ents.sort(descending=True).values[1:3].tolist()
    assert second - third > 1e-3                                   # k = 3 slots, but 2 candidates
    _, plain = eksft_loss_lean(logits, labels, ref, ratio=0.3, return_masks=True)
    _, same = eksft_loss_lean(logits, labels, ref, ratio=0.3, entropy_threshold=None, return_masks=True)
    assert torch.equal(plain["by_entropy"], same["by_entropy"]) and int(plain["n_entropy"]) == 3
    _, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, entropy_threshold=(second + third) / 2,
                          return_masks=True)
    assert rows_of(stats["by_entropy"]) == {(0, i) for i in range(10) if ents[i] > (second + third) / 2}
    assert int(stats["n_entropy"]) == 2
    _, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, entropy_threshold=float("inf"),
                          return_masks=True)
    assert int(stats["n_entropy"]) == 0 and torch.equal(stats["by_kl"], plain["by_kl"])


def test_kl_threshold_zero_still_excludes_zero_kl():
    """KL > threshold is strict: with threshold 0, rows whose reference equals the policy (KL
    exactly 0) are never selected by KL, even when k exceeds the positive-KL rows."""
    logits, labels, ref = hand_case((5,))
    _, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, kl_threshold=0.0, return_masks=True)
    assert rows_of(stats["by_kl"]) == {(0, 5)}
    _, stats = eksft_loss_lean(logits, labels, logits.clone(), ratio=0.3, kl_threshold=0.0)
    assert int(stats["n_kl"]) == 0


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("combine", ["union", "intersection"])
def test_policy_equal_reference_selects_nothing_by_kl(scope, combine):
    logits, labels, _ = make_batch(seed=5)
    loss, stats = eksft_loss_lean(logits, labels, logits.clone(), ratio=0.2, combine=combine, scope=scope)
    n, n_e = int(stats["n_response"]), int(stats["n_entropy"])
    assert int(stats["n_kl"]) == 0 and float(stats["kl"]) == 0.0 and float(stats["kl_reg"]) == 0.0
    assert n_e > 0
    expected_masked = n_e if combine == "union" else 0
    assert int(stats["n_masked"]) == expected_masked
    assert math.isclose(float(stats["masked_frac"]), expected_masked / n, abs_tol=1e-7)
    assert float(stats["iou"]) == 0.0


def test_ties_go_to_the_earlier_position():
    """Identical rows: equal H (and KL); the first k response positions are chosen, for largest
    and smallest, per sequence and over the batch (batch order: sequence 0 first)."""
    V, T = 5, 9
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    logits = row.expand(2, T, V).clone()
    ref = logits.clone()
    ref[..., 0] += 1.0                                   # the same positive KL on every row
    labels = torch.full((2, T), 1)
    labels[:, :3] = IGNORE                               # rows 2..7 predict responses: n = 6 each
    for largest in (True, False):
        _, st = eksft_loss_lean(logits, labels, ref, ratio=0.34, select_largest_entropy=largest,
                           select_largest_kl=largest, return_masks=True)   # k = 2 per sequence
        first_two = {(b, t) for b in range(2) for t in (2, 3)}
        assert rows_of(st["by_entropy"]) == first_two and rows_of(st["by_kl"]) == first_two
        _, st = eksft_loss_lean(logits, labels, ref, ratio=0.34, scope="batch",
                           select_largest_entropy=largest, select_largest_kl=largest,
                           return_masks=True)                             # k = floor(0.34*12) = 4
        first_four = {(0, t) for t in (2, 3, 4, 5)}
        assert rows_of(st["by_entropy"]) == first_four and rows_of(st["by_kl"]) == first_four


# ----------------------------------------------------------------------------
# 5. zero CE gradient on masked tokens


@pytest.mark.parametrize("combine", ["union", "intersection"])
def test_no_gradient_on_masked_rows_without_regularisers(combine):
    logits, labels, ref = make_batch(seed=6)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, ref, ratio=0.5, combine=combine, lambda_entropy=0.0,
                             lambda_kl=0.0, return_masks=True)
    loss.backward()
    masked = rows_of(stats["by_entropy"] | stats["by_kl"] if combine == "union"
                     else stats["by_entropy"] & stats["by_kl"])
    response = rows_of(labels[:, 1:] != IGNORE)
    assert masked and masked < response
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            nonzero = bool(torch.count_nonzero(x.grad[b, t]))
            assert nonzero == ((b, t) in response and (b, t) not in masked), (b, t)


# ----------------------------------------------------------------------------
# 6. low precision and degenerate batches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    logits, labels, ref = make_batch(seed=7, dtype=torch.float32)
    low, low_ref = logits.to(dtype), ref.to(dtype)
    x = low.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, low_ref, ratio=0.2, chunk_size=3)
    loss.backward()
    assert torch.isfinite(loss) and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    for key in ("ce", "entropy", "kl", "ent_reg", "kl_reg"):
        assert stats[key].dtype == torch.float32, key
    # same as the float32 computation on the same (rounded) numbers ...
    same, _ = eksft_loss_lean(low.float(), labels, low_ref.float(), ratio=0.2)
    assert math.isclose(float(loss.detach()), float(same.detach()), rel_tol=1e-5)
    # ... and close to the full-precision result
    full, _ = eksft_loss_lean(logits, labels, ref, ratio=0.2)
    assert math.isclose(float(loss.detach()), float(full.detach()), rel_tol=3e-2)


@pytest.mark.parametrize("ratio,lambdas", [(0.0, (0.0, 0.0)), (0.2, (0.05, 0.05)), (1.0, (0.05, 0.05))])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_all_ignored_is_finite_and_zero(ratio, lambdas, scope):
    logits, _, ref = make_batch(seed=8)
    labels = torch.full(logits.shape[:2], IGNORE)
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, ref, ratio=ratio, lambda_entropy=lambdas[0],
                             lambda_kl=lambdas[1], scope=scope)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    for key, value in stats.items():
        assert torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all(), key
    assert int(stats["n_response"]) == 0 and float(stats["masked_frac"]) == 0.0
    assert selection_slots(labels, 0.5) == 0


@pytest.mark.parametrize("combine", ["union", "intersection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_everything_masked_is_finite(combine, dtype):
    logits, labels, ref = make_batch(seed=9, dtype=dtype)
    ref = ref + 0.0
    ref[:, :, 0] += 5.0                                 # every row above the KL threshold
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss_lean(x, labels, ref, ratio=1.0, combine=combine)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert int(stats["n_kept"]) == 0 and float(stats["ce"]) == 0.0
    assert float(stats["masked_frac"]) == 1.0 and float(stats["iou"]) == 1.0
    y = logits.double().clone().requires_grad_(True)
    ref_loss, _, _, _ = reference_loss(y, labels, ref.double(), ratio=1.0, combine=combine,
                                       gap_check=False)
    assert math.isclose(float(loss.detach()), float(ref_loss.detach()), rel_tol=1e-2 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------
# 7. split invariance of the pure function, and selection_slots


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("ratio,lambdas", [(0.2, (0.05, 0.05)), (0.5, (0.3, 0.7)), (0.0, (0.0, 0.0))])
def test_per_sequence_calls_sum_to_the_batch_call(ratio, lambdas, trim):
    logits, labels, ref = make_batch(seed=11)
    opts = dict(ratio=ratio, lambda_entropy=lambdas[0], lambda_kl=lambdas[1], scope="sequence",
                ce_normalizer=int((labels[:, 1:] != IGNORE).sum()),
                reg_normalizer=max(1, selection_slots(labels, ratio, "sequence")), chunk_size=3)
    whole = logits.clone().requires_grad_(True)
    loss, _ = eksft_loss_lean(whole, labels, ref, **opts)
    loss.backward()

    parts = logits.clone().requires_grad_(True)
    total = 0.0
    for b in range(logits.shape[0]):
        end = logits.shape[1]
        if trim:   # drop this sequence's trailing padding: the same example, unpadded
            end = int((labels[b] != IGNORE).nonzero().max()) + 1
        part, _ = eksft_loss_lean(parts[b:b + 1, :end], labels[b:b + 1, :end], ref[b:b + 1, :end], **opts)
        part.backward()
        total += float(part.detach())
    assert math.isclose(total, float(loss.detach()), rel_tol=1e-6, abs_tol=1e-7)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.29, 0.3, 0.5, 0.57, 0.7, 1.0])
def test_selection_slots(ratio):
    lengths = [0, 1, 5, 7, 10, 100]                     # response tokens per sequence
    T = max(lengths) + 3
    labels = torch.full((len(lengths), T), IGNORE)
    for b, n in enumerate(lengths):
        labels[b, 2: 2 + n] = 1                         # labels[:, 1:] holds them all
    assert selection_slots(labels, ratio, "sequence") == sum(slots(ratio, n) for n in lengths)
    assert selection_slots(labels, ratio, "batch") == slots(ratio, sum(lengths))


def test_minus_inf_logits_give_no_nan():
    """A masked vocabulary entry (logit -inf in both models, never a target): p log p is 0 there,
    not 0 * -inf = NaN, and the result equals that of the batch without the entry."""
    logits, labels, ref = make_batch(seed=3, dtype=torch.float32)
    V = logits.shape[-1]
    labels = torch.where(labels == V - 1, 0, labels)
    logits, ref = logits.clone(), ref.clone()
    logits[..., -1] = float("-inf")
    ref[..., -1] = float("-inf")
    logits.requires_grad_(True)
    loss, stats = eksft_loss_lean(logits, labels, ref, ratio=0.3, lambda_entropy=0.0, lambda_kl=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(stats[k]) for k in ("entropy", "kl", "ce"))
    assert torch.isfinite(logits.grad).all() and (logits.grad[..., -1] == 0).all()
    expect, expect_stats, _, _ = reference_loss(logits.detach()[..., :-1].double(), labels,
                                                ref[..., :-1].double(), ratio=0.3,
                                                lambda_entropy=0.0, lambda_kl=0.1)
    torch.testing.assert_close(loss.double(), expect.detach(), rtol=1e-5, atol=1e-6)
    assert float(stats["entropy"]) == pytest.approx(expect_stats["entropy"], rel=1e-5)
    with_bonus, _ = eksft_loss_lean(logits, labels, ref, ratio=0.3, lambda_entropy=0.1, lambda_kl=0.1)
    assert torch.isfinite(with_bonus)


def test_int32_labels_and_regulariser_stats_without_lambdas():
    logits, labels, ref = make_batch(seed=4, dtype=torch.float32)
    loss64, st64 = eksft_loss_lean(logits, labels, ref, ratio=0.3, lambda_entropy=0.0, lambda_kl=0.0)
    loss32, _ = eksft_loss_lean(logits, labels.int(), ref, ratio=0.3, lambda_entropy=0.0, lambda_kl=0.0)
    assert torch.equal(loss64, loss32)
    # the regularisers' values are reported for a masking-only ablation too
    _, expect, _, _ = reference_loss(logits.double(), labels, ref.double(), ratio=0.3,
                                     lambda_entropy=0.0, lambda_kl=0.0)
    assert expect["ent_reg"] > 0 and expect["kl_reg"] > 0
    assert float(st64["ent_reg"]) == pytest.approx(expect["ent_reg"], rel=1e-5)
    assert float(st64["kl_reg"]) == pytest.approx(expect["kl_reg"], rel=1e-5)


# ----------------------------------------------------------------------------
# 8. the plain eksft_loss (autograd) and eksft_loss_lean (chunks, gradient by hand) agree:
#    value, gradient, stats and masks, for every option


PLAIN_VS_LEAN = [
    dict(),
    dict(ratio=0.5, combine="intersection"),
    dict(ratio=0.3, scope="batch"),
    dict(ratio=0.3, select_largest_entropy=False),
    dict(ratio=0.3, select_largest_kl=False),
    dict(ratio=0.3, kl_threshold=0.0),
    dict(ratio=0.3, kl_threshold=0.5),
    dict(ratio=0.5, entropy_threshold=1.5),
    dict(ratio=0.3, entropy_threshold=float("inf")),
    dict(ratio=0.3, lambda_entropy=0.4, lambda_kl=0.7),
    dict(ratio=0.3, lambda_entropy=0.0, lambda_kl=0.0),
    dict(ratio=0.3, dft=True),
    dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=True),
    dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.3),      # the KL penalty without selection
    dict(ratio=1.0),                                         # everything selected
    dict(ratio=0.3, ce_normalizer=40, reg_normalizer=7),
    dict(ratio=0.5, keep_token_ids=[3, 5]),                  # never select targets 3 or 5
    dict(ratio=0.3, ce_normalizer=torch.tensor(40), reg_normalizer=torch.tensor(7)),
    dict(ratio=0.5, combine="intersection", scope="batch", select_largest_entropy=False,
         select_largest_kl=False, kl_threshold=0.0, entropy_threshold=0.5, dft=True,
         lambda_entropy=0.2, lambda_kl=0.3, ce_normalizer=30, reg_normalizer=4),
]


def plain_and_lean(logits, labels, ref, **options):
    """(loss, gradient, stats) of each loss on the same inputs, the lean one in chunks of 4 rows."""
    results = []
    for loss_fn in (eksft_loss, functools.partial(eksft_loss_lean, chunk_size=4)):
        x = logits.clone().requires_grad_(True)
        loss, stats = loss_fn(x, labels, ref, return_masks=True, **options)
        loss.backward()
        results.append((loss.detach(), x.grad, stats))
    return results


def assert_same_results(plain, lean, rtol=1e-5, atol=1e-6):
    (loss_p, grad_p, stats_p), (loss_l, grad_l, stats_l) = plain, lean
    assert loss_p.dtype == loss_l.dtype == torch.float32 and grad_p.dtype == grad_l.dtype
    torch.testing.assert_close(loss_p, loss_l, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_p, grad_l, rtol=rtol, atol=atol)
    assert stats_p.keys() == stats_l.keys()
    for key, value in stats_p.items():
        if value is None or value.dtype in (torch.bool, torch.int64):    # masks and counts
            assert (value is None and stats_l[key] is None) or torch.equal(value, stats_l[key]), key
        else:
            torch.testing.assert_close(value, stats_l[key], rtol=rtol, atol=atol, equal_nan=True,
                                       msg=key)


@pytest.mark.parametrize("options", PLAIN_VS_LEAN, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "defaults")
def test_plain_equals_lean(options):
    logits, labels, ref = make_batch(seed=12, B=4, T=20, V=17, dtype=torch.float32)
    plain, lean = plain_and_lean(logits, labels, ref, **options)
    assert_same_results(plain, lean)
    assert plain[1].abs().sum() > 0


def test_plain_equals_lean_with_another_ignore_index_and_int32_labels():
    logits, labels, ref = make_batch(seed=13, dtype=torch.float32)
    labels = labels.masked_fill(labels == IGNORE, -1).int()
    assert_same_results(*plain_and_lean(logits, labels, ref, ratio=0.3, ignore_index=-1))


@pytest.mark.parametrize("options", [dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0),
                                     dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=True)])
def test_plain_equals_lean_without_a_reference(options):
    logits, labels, _ = make_batch(seed=14, dtype=torch.float32)
    plain, lean = plain_and_lean(logits, labels, None, **options)
    assert_same_results(plain, lean)
    assert torch.isnan(plain[2]["kl"]) and plain[2]["token_kl"] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_plain_equals_lean_in_other_dtypes(dtype):
    """Both compute in float32 and return the gradient in the logits' dtype."""
    logits, labels, ref = make_batch(seed=15, dtype=dtype)
    plain, lean = plain_and_lean(logits, labels, ref.to(dtype), ratio=0.3)
    assert plain[1].dtype == dtype
    low = dtype in (torch.bfloat16, torch.float16)   # the gradient rounded to 8 or 11 bits
    assert_same_results(plain, lean, rtol=1e-2 if low else 1e-5, atol=1e-4 if low else 1e-6)


def test_plain_equals_lean_with_minus_inf_logits_and_when_all_is_ignored():
    logits, labels, ref = make_batch(seed=16, dtype=torch.float32)
    labels = torch.where(labels == logits.shape[-1] - 1, 0, labels)
    logits[..., -1], ref[..., -1] = float("-inf"), float("-inf")    # a masked vocabulary entry
    plain, lean = plain_and_lean(logits, labels, ref, ratio=0.3, lambda_kl=0.1)
    assert_same_results(plain, lean)
    assert torch.isfinite(plain[1]).all() and (plain[1][..., -1] == 0).all()
    nothing = plain_and_lean(logits, torch.full_like(labels, IGNORE), ref, ratio=0.3)
    assert_same_results(*nothing)
    assert float(nothing[0][0]) == 0.0 and torch.count_nonzero(nothing[0][1]) == 0


def test_plain_equals_lean_when_the_policy_is_the_reference():
    """Step one: KL is 0 everywhere, nothing is selected by KL, the penalty is 0 in both."""
    logits, labels, _ = make_batch(seed=17, dtype=torch.float32)
    plain, lean = plain_and_lean(logits, labels, logits.clone(), ratio=0.3)
    assert_same_results(plain, lean)
    assert int(plain[2]["n_kl"]) == 0 and int(plain[2]["n_entropy"]) > 0


def test_plain_loss_without_selection_is_cross_entropy():
    logits, labels, _ = make_batch(seed=4, dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    loss, _ = eksft_loss(x, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(y[:, :-1].reshape(-1, y.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


def test_plain_loss_keeps_four_vocabulary_sized_tensors_for_backward():
    """The number the README states: autograd saves four (B, T-1, V) fp32 tensors (log p before
    and after the clamp, p, log p - log q); the lean loss saves none of its own, only the logits
    it was given (its backward recomputes the rest, chunk by chunk)."""
    logits, labels, ref = make_batch(seed=1, dtype=torch.float32)
    for loss_fn, expected in ((eksft_loss, 4), (eksft_loss_lean, 0)):
        saved = set()

        def pack(tensor):
            if tensor.dim() == 3 and tensor.shape[-1] == logits.shape[-1]:
                saved.add(tensor.untyped_storage().data_ptr())
            return tensor
        x = logits.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_fn(x, labels, ref)
        given = {t.untyped_storage().data_ptr() for t in (x, ref)}
        assert len(saved - given) == expected, loss_fn.__name__


def test_plain_loss_rejects_what_the_lean_one_rejects():
    logits, labels, _ = make_batch(seed=4)
    for loss_fn in (eksft_loss, eksft_loss_lean):
        with pytest.raises(ValueError, match="ref_logits is required"):
            loss_fn(logits, labels, None, ratio=0.2)
        with pytest.raises(ValueError, match="combine must be"):
            loss_fn(logits, labels, logits, combine="both")


@pytest.mark.parametrize("loss_fn", [eksft_loss, eksft_loss_lean])
def test_keep_token_ids_are_never_selected_and_always_trained(loss_fn):
    """ratio 1 selects every response token it may (by entropy, union): with keep_token_ids the
    kept tokens are exactly the response positions whose target is one of those ids."""
    logits, labels, ref = make_batch(seed=5, B=3, T=24, V=11, dtype=torch.float32)
    _, stats = loss_fn(logits, labels, ref, ratio=1.0, keep_token_ids=[2, 7], return_masks=True)
    targets = labels[:, 1:]
    response = targets != -100
    protected = response & ((targets == 2) | (targets == 7))
    assert protected.any() and (response & ~protected).any()
    masked = stats["by_entropy"] | stats["by_kl"]
    assert torch.equal(response & ~masked, protected)
    assert stats["n_kept"] == protected.sum()
