"""The fast paths against the plain ones they replace.

1. The loss: eksft_loss(compiled=True) runs fused_statistics and fused_gradient (through
   torch.compile) per chunk instead of the plain kernels. Both compute the same formulas in fp32 but
   in a different order (a fused row reduction instead of einsum, exp/log from the compiler's own
   vectorised code), so they agree to float32 rounding, not bit for bit: values and gradients to a
   relative 1e-5, masks exactly (the data has no near ties), and both match the naive float64
   reference of test_loss.py.
Run: python -m pytest tests/test_speed_paths.py -q
"""
import pytest
import torch

import eksft
from eksft import eksft_loss, fused_gradient, fused_statistics
from test_loss import check_stats, make_batch, reference_loss

# ----------------------------------------------------------------------------
# 1. the loss: fused kernels (uncompiled, then compiled) against the plain path

OPTIONS = [  # (ratio, combine, scope, lambdas, with a reference)
    (0.2, "union", "sequence", (0.05, 0.05), True),         # the released recipe
    (0.5, "intersection", "batch", (0.3, 0.7), True),
    (0.0, "union", "sequence", (0.0, 0.0), False),          # plain SFT: no reference at all
    (0.3, "union", "sequence", (0.2, 0.0), True),           # entropy bonus only: no log q needed
]


def run_loss(logits, labels, ref, options, compiled, chunk_size=5):
    ratio, combine, scope, (lam_e, lam_k), with_ref = options
    x = logits.clone().requires_grad_(True)
    loss, stats = eksft_loss(x, labels, ref if with_ref else None, ratio=ratio, combine=combine,
                             scope=scope, lambda_entropy=lam_e, lambda_kl=lam_k,
                             chunk_size=chunk_size, compiled=compiled, return_masks=True)
    loss.backward()
    return loss.detach(), x.grad, stats


def assert_same_result(fast, plain, rtol):
    (loss, grad, stats), (loss0, grad0, stats0) = fast, plain
    torch.testing.assert_close(loss, loss0, rtol=rtol, atol=1e-7)
    assert grad.dtype == grad0.dtype
    torch.testing.assert_close(grad.float(), grad0.float(), rtol=rtol, atol=1e-7)
    for key in ("by_entropy", "by_kl"):
        assert torch.equal(stats[key], stats0[key]), key
    for key in ("token_entropy", "token_kl"):
        if stats0[key] is not None:
            torch.testing.assert_close(stats[key], stats0[key], rtol=rtol, atol=1e-7)


def uncompiled(monkeypatch):
    """Make run_compiled run the fused kernels as plain Python (what it falls back to)."""
    monkeypatch.setattr(eksft, "_COMPILED", {fused_statistics: fused_statistics,
                                             fused_gradient: fused_gradient})


@pytest.mark.parametrize("options", OPTIONS)
def test_fused_kernels_equal_the_plain_path(options, monkeypatch):
    """The fused formulas themselves, run uncompiled (fast): same loss, gradient and masks as the
    plain path, and the naive float64 reference's values."""
    uncompiled(monkeypatch)
    logits, labels, ref = make_batch(seed=21, B=4, T=20, V=17, dtype=torch.float32)
    fast = run_loss(logits, labels, ref, options, compiled=True)
    assert_same_result(fast, run_loss(logits, labels, ref, options, compiled=False), rtol=1e-5)
    ratio, combine, scope, (lam_e, lam_k), with_ref = options
    y = logits.double().requires_grad_(True)
    naive, naive_stats, _, _ = reference_loss(y, labels, ref.double() if with_ref else None,
                                              ratio=ratio, combine=combine, scope=scope,
                                              lambda_entropy=lam_e, lambda_kl=lam_k)
    naive.backward()
    torch.testing.assert_close(fast[0].double(), naive.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1].double(), y.grad, rtol=1e-5, atol=1e-6)
    check_stats(fast[2], naive_stats)


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2]])
def test_fused_kernels_with_bf16_logits(options, monkeypatch):
    """bf16 logits (what autocast gives on a GPU): a bf16 gradient, equal to the plain path's up to
    one bf16 rounding step (the same fp32 value may round to neighbouring bf16 numbers)."""
    uncompiled(monkeypatch)
    logits, labels, ref = make_batch(seed=24, B=4, T=20, V=17, dtype=torch.bfloat16)
    fast = run_loss(logits, labels, ref, options, compiled=True)
    assert fast[1].dtype == torch.bfloat16
    assert_same_result(fast, run_loss(logits, labels, ref, options, compiled=False), rtol=1e-2)


def test_compiled_loss_equals_the_plain_path():
    """torch.compile (inductor) of both kernels on the released recipe, chunks of several lengths
    (dynamic shapes). One case only: on a 2-core CPU compiling takes ~40 s (bf16 logits and the
    reference-free variant are further compiles of ~20 s each; they run uncompiled above)."""
    logits, labels, ref = make_batch(seed=22, B=4, T=20, V=17, dtype=torch.float32)
    fast = run_loss(logits, labels, ref, OPTIONS[0], compiled=True)
    assert_same_result(fast, run_loss(logits, labels, ref, OPTIONS[0], compiled=False), rtol=1e-5)
    # the compiled kernels ran: run_compiled did not fall back to the plain Python kernels
    for kernel in (fused_statistics, fused_gradient):
        assert eksft._COMPILED[kernel] is not kernel, kernel.__name__


def test_compiled_defaults_on_for_cuda_only():
    """compiled=None is off for CPU logits: the default CPU path stays the plain one."""
    eksft._COMPILED.clear()
    logits, labels, ref = make_batch(seed=23, dtype=torch.float32)
    eksft_loss(logits.requires_grad_(True), labels, ref)[0].backward()
    assert eksft._COMPILED == {}
