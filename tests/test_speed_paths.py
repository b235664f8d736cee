"""The fast paths against the plain ones they replace.

1. The loss: eksft_loss(compiled=COMPILED_KERNELS) runs fused_statistics and fused_gradient
   (through torch.compile) per chunk instead of the plain kernels. Both compute the same formulas in fp32 but
   in a different order (a fused row reduction instead of einsum, exp/log from the compiler's own
   vectorised code), so they agree to float32 rounding, not bit for bit: values and gradients to a
   relative 1e-5, masks exactly (the data has no near ties), and both match the naive float64
   reference of test_loss.py.
2. Rollouts: generate_completions(static_cache=True) (transformers' static KV cache; on a GPU its
   decoding step is also compiled, which no CPU test can check) against the default cache: greedy
   completions identical, also with pad == eos and for any batch size (evaluate.py's promise), and
   seeded samples identical (the same sampler draws the same random numbers from the same logits).
Run: python -m pytest tests/test_speed_paths.py -q
"""
import copy
import functools

import pytest
import torch

import eksft
import evaluate
import rl
from data import encode_prompt, load_qa, stop_token_ids
from eksft import (COMPILED_KERNELS, eksft_loss, fused_gradient, fused_statistics,
                   load_model_and_tokenizer)
from test_loss import check_stats, make_batch, naive_dft, reference_loss

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
    fast = run_loss(logits, labels, ref, options, compiled=COMPILED_KERNELS)
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
    fast = run_loss(logits, labels, ref, options, compiled=COMPILED_KERNELS)
    assert fast[1].dtype == torch.bfloat16
    assert_same_result(fast, run_loss(logits, labels, ref, options, compiled=False), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_with_dft(dtype, monkeypatch):
    """--method dft on the fused path: DFT changes only the per-token CE weights the kernels are
    given, so the fused gradient equals the plain path's and the naive computation's."""
    uncompiled(monkeypatch)
    logits, labels, _ = make_batch(seed=25, B=4, T=20, V=17, dtype=dtype)
    results = []
    for compiled in (COMPILED_KERNELS, None):
        x = logits.clone().requires_grad_(True)
        loss, _ = eksft_loss(x, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0,
                             dft=True, chunk_size=5, compiled=compiled)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (loss0, grad0) = results
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, loss0, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grad.float(), grad0.float(), rtol=rtol, atol=1e-7)
    y = logits.double().requires_grad_(True)
    naive_dft(y, labels).backward()
    torch.testing.assert_close(grad.double(), y.grad, rtol=rtol, atol=1e-6 if rtol < 1e-2 else 1e-3)


def test_compiled_loss_equals_the_plain_path():
    """torch.compile (inductor) of both kernels on the released recipe, chunks of several lengths
    (dynamic shapes). One case only: on a 2-core CPU compiling takes ~40 s (bf16 logits and the
    reference-free variant are further compiles of ~20 s each; they run uncompiled above)."""
    logits, labels, ref = make_batch(seed=22, B=4, T=20, V=17, dtype=torch.float32)
    fast = run_loss(logits, labels, ref, OPTIONS[0], compiled=COMPILED_KERNELS)
    assert_same_result(fast, run_loss(logits, labels, ref, OPTIONS[0], compiled=False), rtol=1e-5)
    # the compiled kernels ran: run_compiled did not fall back to the plain Python kernels
    for kernel in (fused_statistics, fused_gradient):
        assert eksft._COMPILED[kernel] is not kernel, kernel.__name__


def test_compiled_is_off_by_default():
    """eksft_loss's default (compiled=None) and the command line's default run the plain kernels."""
    assert eksft.loss_options(eksft.parse_args([]))["compiled"] is None
    assert eksft.loss_options(eksft.parse_args(["--compile-loss"]))["compiled"] is eksft.COMPILED_KERNELS
    eksft._COMPILED.clear()
    logits, labels, ref = make_batch(seed=23, dtype=torch.float32)
    eksft_loss(logits.requires_grad_(True), labels, ref)[0].backward()
    assert eksft._COMPILED == {}


# ----------------------------------------------------------------------------
# 2. rollouts: the static KV cache against transformers' default cache

QUESTIONS = ["1+1?", "What is 12 times 12?", "x", "Ava has 3 pens and buys 4 more. How many now?",
             "Solve 3y = 12 for y.", "abc", "Compute 7*8-5", "hi"]


@pytest.fixture(scope="module")
def chatty():
    """The tiny model with large random weights (completions differ from prompt to prompt) and a
    larger end-of-turn output row, so that greedy completions stop at different lengths and
    some do not stop at all within the budget. One torch thread (tiny ops: two threads wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("tiny", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=generator)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 1.5
    prompts = [encode_prompt(tokenizer, q, system_prompt="") for q in QUESTIONS]
    yield model, tokenizer, prompts
    torch.set_num_threads(before)


def ids_of(results):
    return [r["completion_ids"] for r in results]


def test_static_cache_greedy_equals_the_default_cache(chatty):
    model, tok, prompts = chatty
    assert len({len(p) for p in prompts}) > 4                      # real left padding
    plain = rl.generate_completions(model, tok, prompts, max_new_tokens=24, static_cache=False)
    stopped = [r for r in plain if not r["truncated"]]
    assert stopped and len(stopped) < len(plain), "want completions that stop and ones that do not"
    assert len({tuple(r["completion_ids"]) for r in plain}) == len(plain)   # not trivially equal
    eos = stop_token_ids(model, tok)
    assert all(r["completion_ids"][-1] in eos for r in stopped)
    pad_is_eos = copy.deepcopy(tok)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    for tokenizer in (tok, pad_is_eos):
        for batch_size in (1, 3, 8):
            static = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=24,
                                             batch_size=batch_size, static_cache=True)
            assert static == plain, (tokenizer.pad_token, batch_size)


def test_static_cache_sampling_equals_the_default_cache(chatty):
    """Seeded sampling, temperature and top-p as RL uses them: the very same completions."""
    model, tok, prompts = chatty
    for temperature, top_p in ((1.0, 1.0), (2.0, 0.9)):
        kw = dict(max_new_tokens=16, temperature=temperature, top_p=top_p, seed=7, batch_size=4)
        plain = rl.generate_completions(model, tok, prompts * 2, static_cache=False, **kw)
        static = rl.generate_completions(model, tok, prompts * 2, static_cache=True, **kw)
        assert static == plain
        other_seed = rl.generate_completions(model, tok, prompts * 2, static_cache=True,
                                             **{**kw, "seed": 8})
        assert ids_of(other_seed) != ids_of(plain)


def test_evaluate_greedy_does_not_depend_on_batch_size_with_static_cache(chatty, monkeypatch):
    """evaluate.py's promise, with its generation through the static cache (its default on CUDA)."""
    model, tok, _ = chatty
    monkeypatch.setattr(evaluate, "generate_completions",
                        functools.partial(rl.generate_completions, static_cache=True))
    problems = load_qa("synthetic", limit=5)
    by_size = {bs: evaluate.evaluate_model(model, tok, problems, max_new_tokens=12, batch_size=bs,
                                           progress=False)[0] for bs in (1, 2, 5)}
    texts = {bs: [r["completion"] for r in rows] for bs, rows in by_size.items()}
    assert len(set(texts[1])) == 5 and texts[1] == texts[2] == texts[5]


def test_static_cache_is_off_by_default_on_cpu(chatty, monkeypatch):
    model, tok, prompts = chatty
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    rl.generate_completions(model, tok, prompts[:2], max_new_tokens=4)
    assert "cache_implementation" not in seen[0]
    rl.generate_completions(model, tok, prompts[:2], max_new_tokens=4, static_cache=True)
    assert seen[1]["cache_implementation"] == "static" and seen[1]["max_cache_len"] % 256 == 0
