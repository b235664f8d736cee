"""rl.py beyond the checker: masks, advantages, the loss, split invariance, rollouts, the loop.

Expected values are computed by hand (or by plain Python loops written for the test), never
copied from the code under test. Run: python -m pytest tests/test_rl.py -q
"""
import collections
import contextlib
import copy
import doctest
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from data import PROTOCOLS, UserError, encode_prompt, pad_left, stop_token_ids
import rl
from eksft import load_model_and_tokenizer
from rl import (completion_mask_from_eos, generate_completions, group_advantages, kl_penalty,
                loss_normaliser, parse_args, policy_loss, rl_step, rollout_tensors, sequence_logprobs,
                token_logprobs, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model is many tiny ops: on a busy 2-core machine two torch threads wait for each
    other and run 10x slower than one. Restored after this file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_doctests():
    """The examples in rl.py's docstrings are run, so they cannot drift from the code."""
    result = doctest.testmod(rl)
    assert result.attempted >= 2 and result.failed == 0


# ----------------------------------------------------------------------------
# masks from the first EOS, with pad == eos


def test_mask_from_first_eos_when_pad_is_eos():
    eos = 2                                     # generate pads finished rows with pad == eos == 2
    ids = torch.tensor([[5, 2, 2, 2],           # stops at once: [5, EOS]
                        [5, 6, 2, 2],           # [5, 6, EOS]
                        [5, 6, 7, 8],           # never stops: truncated, every token counts
                        [2, 2, 2, 2],           # EOS first: only that token
                        [5, 2, 6, 2]])          # a second EOS later does not matter
    mask, truncated = completion_mask_from_eos(ids, [eos])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, True, False, False]


def test_mask_with_several_stop_ids():
    ids = torch.tensor([[5, 9, 2, 2], [5, 2, 9, 9]])   # 9 = <|im_end|>, 2 = <|endoftext|>
    mask, truncated = completion_mask_from_eos(ids, [2, 9])
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False]


# ----------------------------------------------------------------------------
# advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0,    # group 1: mean 0.25
                            1.0, 1.0, 1.0, 1.0,    # group 2: all equal, no signal
                            0.0, 1.0, 0.0, 1.0])   # group 3: mean 0.5
    # group 1 sample std (Bessel): sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    # group 3 sample std: sqrt(4 * 0.5^2 / 3) = sqrt(1/3)
    adv, informative = group_advantages(rewards, 4, eps=1e-4)
    s3 = math.sqrt(1 / 3) + 1e-4
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001,
                0, 0, 0, 0, -0.5 / s3, 0.5 / s3, -0.5 / s3, 0.5 / s3]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert informative.tolist() == [True, False, True]
    adv, _ = group_advantages(rewards, 4, scale_by_std=False)   # Dr. GRPO: r - mean
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, 0.5, -0.5, 0.5])


# ----------------------------------------------------------------------------
# the loss against a hand computation


def hand_loss(logp, old, ref, adv, mask, eps_low, eps_high, kl_coef, agg, max_new_tokens, kl_estimator="k3"):
    """The same objective written as plain Python loops over tokens."""
    per_seq, n_tokens = [], 0
    for b in range(len(logp)):
        terms = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[b])
            d = ref[b][t] - logp[b][t]
            kl = (math.exp(d) - d - 1) * (ratio if kl_estimator == "k3-corrected" else 1)
            terms.append(-surrogate + kl_coef * kl)
        per_seq.append(terms)
        n_tokens += len(terms)
    if agg == "token-mean":                      # all tokens of the step
        return sum(sum(s) for s in per_seq) / n_tokens
    if agg == "seq-mean":                        # all completions, a masked-out one counting as 0
        return sum(sum(s) / len(s) for s in per_seq if s) / len(logp)
    return sum(sum(s) for s in per_seq) / (len(logp) * max_new_tokens)


LOGP = [[-1.0, -0.5, -2.0, -0.3], [-0.2, -1.5, -0.7, -0.9], [-0.4, -1.1, -0.6, -0.6], [-0.3] * 4]
OLD = [[-1.2, -0.5, -1.5, -0.3], [-0.9, -1.0, -0.7, -0.1], [-0.4, -1.1, -0.6, -0.6], [-0.3] * 4]
# ratios 1.22, 1, 0.61, 1 / 2.01, 0.61, 1, 0.45 / 1 (a flat group's completion) / 1 (masked out)
REF = [[-0.8, -0.6, -2.1, -1.0], [-0.2, -1.4, -0.5, -0.9], [-0.9, -0.7, -0.6, -0.1], [-1.0] * 4]
ADV = [1.5, -0.7, 0.0, 0.8]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]   # row 4: cut by --mask-truncated


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
@pytest.mark.parametrize("kl_coef,eps_high,estimator", [(0.0, 0.2, "k3"), (0.1, 0.28, "k3"),
                                                       (0.1, 0.2, "k3-corrected")])
def test_policy_loss_matches_hand_computation(agg, kl_coef, eps_high, estimator):
    mask = torch.tensor(MASK, dtype=torch.bool)
    normaliser = loss_normaliser(mask, agg, max_new_tokens=4)
    loss, stats = policy_loss(torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV), mask,
                              normaliser=normaliser, loss_agg=agg, clip_eps=0.2, clip_eps_high=eps_high,
                              ref_logprobs=torch.tensor(REF), kl_coef=kl_coef, kl_estimator=estimator)
    expected = hand_loss(LOGP, OLD, REF, ADV, MASK, 0.2, eps_high, kl_coef, agg, 4, estimator)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["tokens"] == 9


def test_loss_normaliser_by_hand():
    """Every sampled completion counts, also one masked out entirely (TRL does the same)."""
    mask = torch.tensor(MASK, dtype=torch.bool)
    assert loss_normaliser(mask, "token-mean", 4) == 3 + 4 + 2 + 0
    assert loss_normaliser(mask, "seq-mean", 4) == 4
    assert loss_normaliser(mask, "dr-grpo", 1024) == 4 * 1024   # a constant: completions x budget
    with pytest.raises(ValueError):
        loss_normaliser(mask, "nosuch", 4)


def test_clip_fraction_by_hand():
    # "clipped" = the clipped term is the smaller one, so the token gets no gradient.
    # (0,0) ratio e^0.2 = 1.22 > 1.2, A = 1.5 > 0: 1.2 * 1.5 < 1.22 * 1.5 -> clipped
    # (0,2) ratio e^-0.5 = 0.61, A > 0: 0.61 * 1.5 < 0.8 * 1.5 -> unclipped term wins, not clipped
    # (1,0) ratio e^0.7 = 2.01, A = -0.7: -1.41 < -0.84 -> not clipped
    # (1,1) ratio e^-0.5 = 0.61 < 0.8, A < 0: 0.8 * -0.7 = -0.56 < -0.42 -> clipped
    # (1,3) ratio e^-0.8 = 0.45, A < 0: -0.56 < -0.31 -> clipped
    # the other masked tokens have ratio 1: 3 of 9 clipped
    mask = torch.tensor(MASK, dtype=torch.bool)
    _, stats = policy_loss(torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV), mask, normaliser=9)
    assert stats["clipped_tokens"] == 3


def test_one_epoch_is_reinforce_with_a_group_baseline():
    """With old = logprobs.detach(), d loss / d logp_t = -A_b * mask / normaliser (token-mean)."""
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor(ADV), mask, normaliser=9)
    loss.backward()
    expected = [[-ADV[b] * MASK[b][t] / 9 for t in range(4)] for b in range(4)]
    assert torch.allclose(logp.grad, torch.tensor(expected))


# ----------------------------------------------------------------------------
# the KL estimators: the value, and the direction of the gradient, on a 5-token vocabulary


def expected_penalty(logits, old_logits, ref_logp, estimator):
    """E_{x ~ pi_old}[kl_penalty(x)], summed exactly over the vocabulary (no sampling)."""
    logp = torch.log_softmax(logits, dim=-1)                               # (V,)
    old_logp = torch.log_softmax(old_logits, dim=-1).detach()             # (V,)
    penalty = kl_penalty(logp, ref_logp, torch.exp(logp - old_logp), estimator)   # (V,)
    return (old_logp.exp() * penalty).sum()


@pytest.mark.parametrize("off_policy", [False, True])
def test_kl_estimator_gradients_point_where_the_docstring_says(off_policy):
    torch.manual_seed(0)
    start = torch.randn(5)
    ref_logp = torch.log_softmax(torch.randn(5), dim=-1)
    old_logits = start + (0.7 * torch.randn(5) if off_policy else 0)    # the policy that sampled

    def grad(f):
        logits = start.clone().requires_grad_(True)
        f(logits).backward()
        return logits.grad

    def exact_kl(p_logp, q_logp):                                          # KL(p || q) = sum p log(p / q)
        return (p_logp.exp() * (p_logp - q_logp)).sum()

    forward = grad(lambda z: exact_kl(torch.log_softmax(z, -1), ref_logp))    # grad KL(pi || ref)
    backward = grad(lambda z: exact_kl(ref_logp, torch.log_softmax(z, -1)))   # grad KL(ref || pi)
    assert (forward - backward).abs().max() > 0.05                          # the two really differ
    corrected = grad(lambda z: expected_penalty(z, old_logits, ref_logp, "k3-corrected"))
    assert torch.allclose(corrected, forward, atol=1e-6)                     # on- and off-policy
    if not off_policy:
        k3 = grad(lambda z: expected_penalty(z, start, ref_logp, "k3"))
        assert torch.allclose(k3, backward, atol=1e-6)
        # and the value of both is KL(pi || ref) on-policy (unbiased)
        logp = torch.log_softmax(start, -1)
        for estimator in ("k3", "k3-corrected"):
            value = expected_penalty(start, start, ref_logp, estimator)
            assert value.item() == pytest.approx(exact_kl(logp, ref_logp).item(), rel=1e-5)


def test_token_logprobs_uses_the_sampling_temperature():
    logits = torch.tensor([[[1.0, 2.0, 0.5]]])                  # (1, 1, 3)
    lp, ent = token_logprobs(logits, torch.tensor([[1]]), temperature=0.5)
    z = [2.0, 4.0, 1.0]                                         # logits / 0.5
    log_norm = math.log(sum(math.exp(v) for v in z))
    assert lp.item() == pytest.approx(4.0 - log_norm)
    p = [math.exp(v - log_norm) for v in z]
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p))


# ----------------------------------------------------------------------------
# gradient accumulation: the same update whatever the micro-batch split


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
def test_same_gradient_for_any_micro_batch_split(agg):
    torch.manual_seed(0)
    B, T, V, D = 6, 5, 7, 4
    features = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    lengths = torch.tensor([5, 1, 3, 5, 2, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]           # (B, T) very different lengths
    advantages = torch.randn(B)
    ref = torch.randn(B, T)

    def gradient(split):
        weight = torch.nn.Parameter(torch.randn(D, V, generator=torch.Generator().manual_seed(1)))
        normaliser = loss_normaliser(mask, agg, max_new_tokens=T)   # once, for the whole step
        start = 0
        for size in split:
            sl = slice(start, start + size)
            logp, _ = token_logprobs(features[sl] @ weight, tokens[sl])
            loss, _ = policy_loss(logp, logp.detach() - 0.1, advantages[sl], mask[sl],
                                  normaliser=normaliser, loss_agg=agg, ref_logprobs=ref[sl], kl_coef=0.05)
            loss.backward()
            start += size
        return weight.grad

    full = gradient([6])
    for split in ([1] * 6, [2, 4], [5, 1], [3, 3]):
        assert torch.allclose(gradient(split), full, atol=1e-6), split


# ----------------------------------------------------------------------------
# training tensors for rollouts


def test_rollout_tensors_align_completions():
    prompts = [[11, 12, 13], [21]]
    completions = [[31, 2], [41, 42, 43, 2]]
    batch = rollout_tensors(prompts, completions, pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 31, 2, 0, 0], [0, 0, 21, 41, 42, 43, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    pos = batch.position_ids
    assert pos[0, :5].tolist() == [0, 1, 2, 3, 4] and pos[1, 2:].tolist() == [0, 1, 2, 3, 4]
    assert batch.completion_ids.tolist() == [[31, 2, 0, 0], [41, 42, 43, 2]]
    assert batch.loss_mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    second = batch.rows([1], CPU)                            # a micro-batch keeps the field names
    assert second.completion_ids.tolist() == [[41, 42, 43, 2]] and second.loss_mask.all()


# ----------------------------------------------------------------------------
# rollouts with the tiny model of eksft.py

QUESTIONS = ["1+1?", "What is 12 times 12?", "x", "Ava has 3 pens and buys 4 more. How many now?"]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", CPU, seed=0)


def prompts_of(tokenizer, questions):
    return [encode_prompt(tokenizer, q, system_prompt="") for q in questions]


def test_greedy_does_not_depend_on_batch_size(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, QUESTIONS)                    # four different lengths: real left padding
    together = generate_completions(model, tok, prompts, max_new_tokens=12)
    one_by_one = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=1)
    pairs = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert [r["completion_ids"] for r in together] == [r["completion_ids"] for r in one_by_one]
    assert [r["completion_ids"] for r in together] == [r["completion_ids"] for r in pairs]


def test_completions_end_at_the_first_eos_even_when_pad_is_eos(tiny):
    model, tok = tiny
    eos = stop_token_ids(model, tok)
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = tok2.eos_token                          # pad == eos, as for several real tokenizers
    assert tok2.pad_token_id in eos
    prompts = prompts_of(tok, QUESTIONS * 4)
    # temperature 3 flattens the random model's distribution: some completions stop, some do not
    runs = [generate_completions(model, t, prompts, max_new_tokens=40, temperature=3.0, seed=1) for t in (tok, tok2)]
    assert [r["completion_ids"] for r in runs[0]] == [r["completion_ids"] for r in runs[1]]
    finished = [r for r in runs[1] if not r["truncated"]]
    cut = [r for r in runs[1] if r["truncated"]]
    assert finished and cut, "the seed should give both finished and truncated completions"
    for r in finished:                                       # exactly one EOS, and it is the last token
        assert r["completion_ids"][-1] in eos
        assert sum(i in eos for i in r["completion_ids"]) == 1
    for r in cut:                                            # no EOS at all, full budget used
        assert len(r["completion_ids"]) == 40 and not any(i in eos for i in r["completion_ids"])
    assert all(r["text"] == tok.decode(r["completion_ids"], skip_special_tokens=True) for r in runs[1])


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, QUESTIONS)
    a, b, c = (generate_completions(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=s)
               for s in (5, 5, 6))
    assert a == b and a != c


def test_recomputed_logprobs_match_the_sampling_distribution(tiny):
    """The training forward (left-padded prompts, right-padded completions, explicit position ids,
    temperature) gives the log-probs of the distribution that generate sampled from."""
    model, tok = tiny
    prompts = prompts_of(tok, QUESTIONS)
    ids, attn = pad_left(prompts, tok.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=True,
                             temperature=0.7, top_k=0, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
        completions = out.sequences[:, ids.shape[1]:]                       # (4, 8)
        sampled = torch.log_softmax(torch.stack(out.logits, dim=1) / 0.7, dim=-1)   # (4, 8, V)
        expected = sampled.gather(-1, completions.unsqueeze(-1)).squeeze(-1)        # (4, 8)
        batch = rollout_tensors(prompts, completions.tolist(), tok.pad_token_id)
        got, _ = sequence_logprobs(model, batch, temperature=0.7)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
def test_rl_step_update_does_not_depend_on_the_micro_batch_size(tiny, agg):
    """The same rollouts give the same parameter update (plain SGD, so update = -lr * gradient)
    with 8 completions per forward pass, 3 (uneven: 3 + 3 + 2) or 1."""
    model, tok = tiny
    prompts = prompts_of(tok, QUESTIONS) * 2
    rollouts = generate_completions(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=0)
    advantages = torch.linspace(-1.0, 1.0, len(prompts))
    updates = []
    for micro in (8, 3, 1):
        policy = copy.deepcopy(model)
        args = parse_args(["--model", "tiny", "--micro-batch-size", str(micro), "--loss-agg", agg,
                           "--max-new-tokens", "10", "--grad-clip", "1e9"])
        before = [p.detach().clone() for p in policy.parameters()]
        rl_step(policy, None, torch.optim.SGD(policy.parameters(), lr=1.0), prompts, rollouts, advantages,
                args, tok.pad_token_id, CPU, contextlib.nullcontext)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]))
    assert updates[0].abs().max() > 1e-3                   # a real update, far above the tolerance
    assert torch.allclose(updates[1], updates[0], atol=1e-6) and torch.allclose(updates[2], updates[0], atol=1e-6)


def naive_step_gradient(model, ref_model, prompts, rollouts, advantages, agg, kl_coef, estimator,
                        max_new_tokens):
    """The step's gradient and entropy written without rl.py's batching: one unpadded forward per
    completion, every completion in the loss (flat groups too), the step's denominator by hand."""
    lengths = [len(r["completion_ids"]) for r in rollouts]
    denominator = {"token-mean": sum(lengths), "seq-mean": len(rollouts),
                   "dr-grpo": len(rollouts) * max_new_tokens}[agg]
    model.zero_grad()
    entropy_sum = 0.0
    for prompt, rollout, adv in zip(prompts, rollouts, advantages.tolist()):
        ids = torch.tensor([prompt + rollout["completion_ids"]])
        P, T = len(prompt), len(rollout["completion_ids"])
        scored = ids[0, P:]                                           # logits[P - 1 + t] predicts ids[P + t]
        logp_all = torch.log_softmax(model(ids).logits[0, P - 1:P - 1 + T], dim=-1)
        logp = logp_all.gather(1, scored[:, None])[:, 0]             # (T,)
        entropy_sum += -(logp_all.exp() * logp_all).sum().item()
        total = -(adv * torch.exp(logp - logp.detach())).sum()       # REINFORCE: ratio 1, A grad log pi
        if kl_coef:
            with torch.no_grad():
                ref_all = torch.log_softmax(ref_model(ids).logits[0, P - 1:P - 1 + T], dim=-1)
            d = ref_all.gather(1, scored[:, None])[:, 0] - logp
            k3 = torch.exp(d) - d - 1                                 # corrected: times pi / pi_old
            kl = k3 * torch.exp(logp - logp.detach()) if estimator == "k3-corrected" else k3
            total = total + kl_coef * kl.sum()
        (total / (T if agg == "seq-mean" else 1) / denominator).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), entropy_sum / sum(lengths)


def sgd_update(model, ref_model, prompts, rollouts, advantages, *flags):
    """(the parameter change of one rl_step with plain SGD at lr 1 = minus the gradient, its sums)."""
    policy = copy.deepcopy(model)
    before = [p.detach().clone() for p in policy.parameters()]
    args = parse_args(["--model", "tiny", "--micro-batch-size", "3", "--max-new-tokens", "10",
                       "--grad-clip", "1e9", *flags])
    sums = rl_step(policy, ref_model, torch.optim.SGD(policy.parameters(), lr=1.0), prompts, rollouts,
                   advantages, args, 0, CPU, contextlib.nullcontext)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]), sums


@pytest.fixture(scope="module")
def step_inputs(tiny):
    """Two groups of 4 completions from the tiny model, the second group flat (advantage 0), and a
    reference model that differs from the policy, so that the KL term is not zero."""
    model, tok = tiny
    prompts = [p for p in prompts_of(tok, QUESTIONS[:2]) for _ in range(4)]
    rollouts = generate_completions(model, tok, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, ref_model, prompts, rollouts, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("agg,kl_coef,estimator", [("token-mean", 0.0, "k3"), ("token-mean", 0.3, "k3"),
                                                   ("dr-grpo", 0.3, "k3-corrected"), ("seq-mean", 0.3, "k3")])
def test_step_with_flat_groups_matches_a_naive_computation(step_inputs, agg, kl_coef, estimator):
    """A flat group stays in the denominator always and in the KL term when there is one; without
    KL, skipping its backward pass changes nothing. Entropy is over all sampled completions."""
    model, ref_model, prompts, rollouts, adv = step_inputs
    update, sums = sgd_update(model, ref_model if kl_coef else None, prompts, rollouts, adv,
                              "--loss-agg", agg, "--kl-coef", str(kl_coef), "--kl-estimator", estimator)
    gradient, entropy = naive_step_gradient(copy.deepcopy(model), ref_model, prompts, rollouts, adv, agg,
                                            kl_coef, estimator, max_new_tokens=10)
    assert gradient.abs().max() > 1e-3
    assert torch.allclose(-update, gradient, atol=1e-6)
    assert sums["tokens"] == sum(len(r["completion_ids"]) for r in rollouts)
    assert sums["entropy_sum"] / sums["tokens"] == pytest.approx(entropy, rel=1e-5)


def test_kl_pulls_on_a_step_of_only_flat_groups(step_inputs):
    model, ref_model, prompts, rollouts, _ = step_inputs
    flat = torch.zeros(len(rollouts))
    for estimator in ("k3", "k3-corrected"):
        update, sums = sgd_update(model, ref_model, prompts, rollouts, flat, "--kl-coef", "0.3",
                                  "--kl-estimator", estimator)
        gradient, _ = naive_step_gradient(copy.deepcopy(model), ref_model, prompts, rollouts, flat,
                                          "token-mean", 0.3, estimator, max_new_tokens=10)
        assert update.abs().max() > 1e-4 and torch.allclose(-update, gradient, atol=1e-6)
        assert sums["kl_sum"] > 0
    update, sums = sgd_update(model, None, prompts, rollouts, flat)        # no KL: nothing to learn
    assert update.abs().max() == 0 and sums["loss"] is None and sums["entropy_sum"] > 0


@pytest.fixture(scope="module")
def uneven_rollouts(tiny):
    """16 completions of 4 prompts of different lengths: some stop after a few tokens, some run to
    the 40-token budget (truncated); advantages of 4 groups of 4, the last one flat."""
    model, tok = tiny
    prompts = prompts_of(tok, QUESTIONS * 4)
    rollouts = generate_completions(model, tok, prompts, max_new_tokens=40, temperature=3.0, seed=1)
    lengths = sorted(len(r["completion_ids"]) for r in rollouts)
    assert lengths[0] < 20 and lengths[-1] == 40 and any(r["truncated"] for r in rollouts)
    rewards = torch.tensor([1., 0., 0., 1., 0., 0., 0., 1., 1., 1., 0., 1., 1., 1., 1., 1.])
    return prompts, rollouts, group_advantages(rewards, 4)[0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
@pytest.mark.parametrize("extra", [[], ["--mask-truncated"], ["--kl-coef", "0.3"],
                                   ["--mask-truncated", "--kl-coef", "0.3"]])
def test_micro_batches_cut_to_their_own_lengths_give_the_padded_update(tiny, uneven_rollouts,
                                                                       monkeypatch, agg, extra):
    """rl_step sorts rows by length and cuts each micro-batch to its own longest prompt and
    completion: the same loss, metric sums and parameter update (plain SGD at lr 1: minus the
    gradient) as every micro-batch padded to the step's longest, as rl.py did before."""
    model, tok = tiny
    prompts, rollouts, advantages = uneven_rollouts
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    args = parse_args(["--model", "tiny", "--micro-batch-size", "3", "--max-new-tokens", "40",
                       "--grad-clip", "1e9", "--loss-agg", agg, *extra])
    widths = []
    record = lambda model, batch, temperature: (widths.append(batch.input_ids.shape[1]),
                                                sequence_logprobs(model, batch, temperature))[1]
    monkeypatch.setattr(rl, "sequence_logprobs", record)

    def step():
        policy = copy.deepcopy(model)
        before = [p.detach().clone() for p in policy.parameters()]
        sums = rl_step(policy, ref_model if args.kl_coef else None,
                       torch.optim.SGD(policy.parameters(), lr=1.0), prompts, rollouts, advantages,
                       args, tok.pad_token_id, CPU, contextlib.nullcontext)
        changes = [(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]
        return torch.cat(changes), sums

    cut, cut_sums = step()
    cut_widths, widths[:] = widths[:], []
    with monkeypatch.context() as m:                # the rows at the width of the whole step
        m.setattr(rl.RolloutBatch, "rows",
                  lambda self, index, device: rl.RolloutBatch(*(t[index].to(device) for t in self)))
        padded, padded_sums = step()
    full_width = max(map(len, prompts)) + 40
    assert set(widths) == {full_width} and min(cut_widths) < full_width - 20
    assert padded.abs().max() > 1e-3
    assert torch.allclose(cut, padded, atol=1e-6)
    assert cut_sums.keys() == padded_sums.keys()
    for key, value in padded_sums.items():
        assert cut_sums[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_micro_batches_group_similar_lengths(tiny, uneven_rollouts, monkeypatch):
    """Each micro-batch holds completions of neighbouring lengths: sorted, 3 at a time."""
    model, tok = tiny
    prompts, rollouts, advantages = uneven_rollouts
    seen = []
    record = lambda model, batch, temperature: (seen.append(batch.loss_mask.sum(dim=1).tolist()),
                                                sequence_logprobs(model, batch, temperature))[1]
    monkeypatch.setattr(rl, "sequence_logprobs", record)
    args = parse_args(["--model", "tiny", "--micro-batch-size", "3", "--max-new-tokens", "40"])
    rl_step(copy.deepcopy(model), None, torch.optim.SGD(model.parameters(), lr=0.0), prompts,
            rollouts, advantages, args, tok.pad_token_id, CPU, contextlib.nullcontext)
    trained = sorted(len(r["completion_ids"]) for r, a in zip(rollouts, advantages) if a != 0)
    flat = sorted(len(r["completion_ids"]) for r, a in zip(rollouts, advantages) if a == 0)
    flat_batches = -(-len(flat) // 3)               # the flat group's entropy-only forwards first
    assert [sorted(b) for b in seen] == ([flat[i:i + 3] for i in range(0, len(flat), 3)]
                                         + [trained[i:i + 3] for i in range(0, len(trained), 3)])
    assert len(seen) == flat_batches + -(-len(trained) // 3)


# ----------------------------------------------------------------------------
# the same loss as TRL's GRPOTrainer on the same per-token log-probs


def trl_loss(logp, old, ref, adv, mask, loss_type, bias_correction, max_len, beta=0.1):
    """TRL 1.16's GRPOTrainer._compute_loss on given per-token log-probs, with a stand-in trainer
    (one process, no gradient accumulation, no vLLM): only the attributes that method reads."""
    from trl import GRPOTrainer

    class OneProcess:
        num_processes = 1
        reduce = staticmethod(lambda x, reduction: x)
        gather = staticmethod(lambda x: x)

    B, T = logp.shape
    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None,
                                   steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=OneProcess(), _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1).long(),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


@pytest.mark.parametrize("agg,loss_type", [("token-mean", "dapo"), ("seq-mean", "grpo"),
                                           ("dr-grpo", "dr_grpo")])
@pytest.mark.parametrize("estimator", ["k3", "k3-corrected"])
def test_same_loss_and_gradient_as_trl(agg, loss_type, estimator):
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("1.16."):
        pytest.skip(f"the stand-in trainer follows TRL 1.16's _compute_loss, this is TRL {trl.__version__}")
    mask = torch.tensor(MASK, dtype=torch.bool)           # with a flat group's row and a masked-out row
    old, ref, adv = torch.tensor(OLD), torch.tensor(REF), torch.tensor(ADV)
    ours_logp, trl_logp = (torch.tensor(LOGP, requires_grad=True) for _ in range(2))
    ours, _ = policy_loss(ours_logp, old, adv, mask, normaliser=loss_normaliser(mask, agg, 4),
                          loss_agg=agg, clip_eps=0.2, clip_eps_high=0.28, ref_logprobs=ref, kl_coef=0.1,
                          kl_estimator=estimator)
    theirs = trl_loss(trl_logp, old, ref, adv, mask, loss_type, estimator == "k3-corrected", max_len=4)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(ours_logp.grad, trl_logp.grad, atol=1e-7)


def test_held_out_accuracy_is_scored_under_the_evaluation_protocol(tiny, monkeypatch):
    """rl.py's held-out accuracy uses evaluate.py's protocols: the same prompt, extraction, checker."""
    model, tok = tiny
    seen = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, static_cache=False):
        seen.extend(prompts)
        return [{"completion_ids": [1], "truncated": False, "text": "2 + 2 makes 4"} for _ in prompts]

    monkeypatch.setattr(rl, "generate_completions", fake_generate)
    rows = [{"question": "2+2?", "answer": "4"}]
    for name, expected in (("qwen-math", 1.0), ("strict", 0.0)):   # only the harness takes the last number
        args = parse_args(["--model", "tiny", "--eval-protocol", name, "--checker", "builtin",
                           "--system-prompt", "a training prompt"])
        assert rl.evaluate_accuracy(model, tok, rows, args, contextlib.nullcontext) == expected
    assert seen == [encode_prompt(tok, "2+2?", PROTOCOLS[name]["system_prompt"])
                    for name in ("qwen-math", "strict")]


# ----------------------------------------------------------------------------
# the loop


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def quick_args(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{i}+{i}?", "answer": str(2 * i)} for i in range(40)])
    return parse_args(["--model", "tiny", "--data", data, "--system-prompt", "", "--eval-size", "4",
                       "--max-new-tokens", "12", "--group-size", "4", "--prompts-per-step", "4",
                       "--print-every", "0", "--log-every", "100", "--output-dir", str(tmp_path / "run"),
                       *extra])


def test_mean_reward_rises_on_a_learnable_reward(tmp_path):
    """Toy reward = fraction of digits in the completion. A random tiny model starts near the
    share of digits in its vocabulary (under 10%); 24 seeded steps of REINFORCE must raise it a lot."""
    args = quick_args(tmp_path, "--reward", "digits", "--max-steps", "24", "--lr", "5e-3",
                      "--max-new-tokens", "8", "--eval-size", "0", "--save-every", "0")
    _, _, history = train(args)
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.2 and last > first + 0.3, (first, last)


def test_resume_continues_exactly(tmp_path):
    """3 steps in one go == 2 steps, stop, --resume for the third (weights, optimizer, data order
    and sampling seeds all restored)."""
    straight = train(quick_args(tmp_path / "a", "--max-steps", "3", "--save-every", "0"))[2]
    train(quick_args(tmp_path / "b", "--max-steps", "2", "--save-every", "1"))
    resumed = train(quick_args(tmp_path / "b", "--max-steps", "3", "--resume"))[2]
    assert len(resumed) == 1 and resumed[0]["step"] == 3
    for key in ("reward", "response_length", "loss"):
        assert resumed[0][key] == pytest.approx(straight[2][key], rel=1e-5), key
    run = tmp_path / "b" / "run"
    assert (run / "checkpoint-3" / "args.json").exists() and (run / "config.json").exists()
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [l["step"] for l in lines if "reward" in l] == [1, 2, 3]
    assert {"reward", "accuracy", "response_length", "truncated_frac", "entropy", "kl", "clip_frac",
            "flat_groups", "gen_tokens_per_s", "train_tokens_per_s"} <= set(lines[1])
    assert any("eval_accuracy" in l for l in lines)


def scripted_generate(replies):
    """A generate_completions stand-in: prompt j of a step gets replies[j % len(replies)], a
    (text, truncated) pair whose %s is the gold of its "i+i?" question (2i)."""
    def fake_generate(model, tokenizer, prompts, **kwargs):
        out = []
        for j, ids in enumerate(prompts):
            i = int(re.search(r"(\d+)\+\1\?", tokenizer.decode(ids))[1])
            text, truncated = replies[j % len(replies)]
            text = text.replace("%s", str(2 * i))
            out.append({"completion_ids": tokenizer(text)["input_ids"], "truncated": truncated,
                        "text": text})
        return out
    return fake_generate


@pytest.mark.parametrize("fallback, expected", [([], 0.25), (["--reward-last-number"], 0.5)])
def test_logged_accuracy_is_the_mean_reward(tmp_path, monkeypatch, fallback, expected):
    """One verdict per completion (rl.grade): with --reward math and no format reward, the logged
    accuracy IS the mean reward, fallback or not. Each group of 4: a right stated answer, the right
    number stated nowhere (right only through the last-number fallback), a wrong stated answer and
    no answer at all."""
    replies = [("The answer is \\boxed{%s}.", False), ("So it makes %s.", False),
               ("The answer is \\boxed{1000}.", False), ("I do not know.", False)]
    monkeypatch.setattr(rl, "generate_completions", scripted_generate(replies))
    history = train(quick_args(tmp_path, "--reward", "math", "--checker", "builtin", *fallback,
                               "--max-steps", "1", "--eval-size", "0", "--save-every", "0"))[2]
    assert history[0]["accuracy"] == history[0]["reward"] == expected


@pytest.mark.parametrize("flags, expected", [((), 0.25), (("--reward-truncated",), 0.5)])
def test_a_truncated_completion_is_wrong_and_earns_nothing(tmp_path, monkeypatch, flags, expected):
    """Each group of 4: a right stated answer that ended, the same answer stated inside a loop
    that ran out of tokens (truncated), a wrong answer, no answer. By default the loop is wrong
    and earns 0 (rl.py's docstring, item 8), in the reward and in the logged accuracy alike."""
    replies = [("The answer is \\boxed{%s}.", False), ("The answer is %s. " * 5, True),
               ("The answer is \\boxed{1000}.", False), ("I do not know.", False)]
    monkeypatch.setattr(rl, "generate_completions", scripted_generate(replies))
    history = train(quick_args(tmp_path, "--reward", "math", "--checker", "builtin", *flags,
                               "--max-steps", "1", "--eval-size", "0", "--save-every", "0"))[2]
    assert history[0]["accuracy"] == history[0]["reward"] == expected


def test_kl_and_ppo_epochs_run(tmp_path):
    """--kl-coef loads the reference (KL logged, 0 at the first step: policy == start) and
    --ppo-epochs 2 reuses the batch with a clipped ratio."""
    history = train(quick_args(tmp_path, "--reward", "digits", "--max-steps", "2", "--kl-coef", "0.1",
                               "--ppo-epochs", "2", "--loss-agg", "seq-mean", "--no-std", "--eval-size", "0"))[2]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["kl"] > 0 and history[1]["clip_frac"] is not None


def test_flat_groups_and_truncated_completions_carry_no_loss(tmp_path):
    # the maths reward on a random model: every reward is 0, so all 4 groups are flat and skipped
    flat = train(quick_args(tmp_path / "a", "--reward", "math", "--max-steps", "1", "--eval-size", "0"))[2]
    assert flat[0]["flat_groups"] == flat[0]["groups"] == 4 and flat[0]["loss"] is None
    # 2 new tokens: every completion is truncated; some groups carry signal, but --mask-truncated
    # leaves nothing to train on
    cut = train(quick_args(tmp_path / "b", "--reward", "digits", "--max-steps", "1", "--eval-size", "0",
                           "--max-new-tokens", "2", "--mask-truncated"))[2]
    assert cut[0]["truncated_frac"] == 1.0 and cut[0]["flat_groups"] < 4 and cut[0]["loss"] is None


def test_bad_jsonl_row_is_one_clear_message(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    proc = subprocess.run([sys.executable, "rl.py", "--model", "tiny", "--data", bad, "--output-dir",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}, row 2: missing field 'answer'"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("completion, default, last_number", [
    ("So Kim has 70 apples now.", 0.0, 1.0),                # not stated: only the fallback reads 70
    ("So Kim has 71 apples now.", 0.0, 0.0),
    ("Kim has 70. The answer is \\boxed{70}.", 1.0, 1.0),   # a stated answer: both read it
    ("The answer is \\boxed{7}. So 70.", 0.0, 0.0),         # a stated wrong answer is never overruled
])
def test_the_default_reward_scores_only_a_stated_answer(completion, default, last_number):
    base = ["--model", "tiny", "--reward", "math", "--checker", "builtin"]
    reward = lambda argv: rl.reward_function(rl.parse_args(base + argv))(completion, "70")[0]
    assert reward([]) == default
    assert reward(["--strict-reward"]) == default           # the default now, kept for old commands
    assert reward(["--reward-last-number"]) == last_number  # the qwen-math protocol's rule
    with pytest.raises(UserError, match="not allowed with"):
        rl.parse_args(base + ["--strict-reward", "--reward-last-number"])
