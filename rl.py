"""RL with verifiable rewards (GRPO-style) from an SFT or EKSFT checkpoint.

The paper's second claim is that EKSFT gives RL a better starting point. Train both checkpoints
with this file, evaluate both with evaluate.py, and compare.

Run me:
    python rl.py --model tiny --max-steps 3                      # offline CPU sanity run (synthetic)
    python rl.py --model runs/eksft/final --data gsm8k-train     # the real thing, one GPU
    python rl.py --model Qwen2.5-0.5B --data gsm8k --no-std --loss-agg dr-grpo   # Dr. GRPO flavour

The file reads top to bottom:
  1. the answer checker (extract_answer, is_equiv, math_reward): pure functions, shared with
     evaluate.py; model output is parsed, never executed, and a hostile string cannot hang it
  2. rollouts: left-padded batched sampling, completion masks cut at the first end-of-sequence token
  3. the loss: group-normalised advantages, clipped ratio, optional k3 KL to the starting model
  4. the loop: sample, score, update, log, evaluate, checkpoint

Simplifications (say them out loud; they are choices, not accidents):
  1. With --ppo-epochs 1 (the default) the ratio is exactly 1 and its gradient is the policy
     gradient: this is REINFORCE with a group-mean baseline. K > 1 reuses each batch K times
     with the PPO clipped ratio (epsilon 0.2, --clip-high for a separate upper epsilon).
  2. No value network, no GAE: the advantage of every token of a completion is that completion's
     group-normalised reward.
  3. Generation runs in the same process with transformers' generate (no vLLM): slow but simple.
  4. No KL penalty by default (--kl-coef 0, then no reference model is loaded at all).
  5. Groups whose G rewards are all equal have zero advantage: they are skipped and counted,
     not resampled (DAPO's dynamic sampling would resample them).
  6. The built-in answer checker is a normaliser plus a tiny numeric parser, not a computer
     algebra system: it knows numbers, fractions, percents, powers, products, tuples and
     intervals; anything else falls back to normalised string equality. --checker math-verify
     swaps in the math-verify package for equivalence (it must be installed separately).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch

from data import SYSTEM_PROMPT, UserError, encode_prompt, end_of_turn_ids, load_qa, pad_left, pad_right
from eksft import (append_jsonl, export_model, latest_checkpoint, load_model_and_tokenizer, pick_device,
                   prune_checkpoints, save_checkpoint, set_seed, write_json)

# ----------------------------------------------------------------------------
# 1. The answer checker
#
# extract_answer(text) finds the final answer in a completion; is_equiv(pred, gold) decides whether
# two answers are the same; math_reward(completion, gold) is 1.0 or 0.0. Rules:
#   - nothing here calls eval/exec/sympify: numbers are read by a 60-line recursive-descent parser;
#   - every loop is linear in the input, recursion depth and exponents are capped, every error is
#     caught: a hostile string (1 MB, unbalanced braces, 9^{9^{9^9}}, 1/0) returns in well under 1 s.

_MAX_ANSWER_CHARS = 1000   # an "answer" longer than this is compared as a plain string
_MAX_DEPTH = 40            # nesting depth the numeric parser and tuple splitter accept
_MAX_EXPONENT = 1000       # |exponent| the numeric parser evaluates (2^{1000} is fine, 9^{9^9} is not)
_REL_TOL = 1e-4            # numbers are equal when |a - b| <= 1e-4 * max(|a|, |b|)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"(?i)the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_TOKEN_AFTER_BOX_RE = re.compile(r"[^\s$]+")


def _brace_partners(text):
    """{index of '{': index of its matching '}'} for the whole string, in one linear pass."""
    stack, partner = [], {}
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            partner[stack.pop()] = m.start()
    return partner


def _last_boxed(text):
    """Content of the last complete \\boxed{...} / \\fbox{...} / `\\boxed 5`, else None.
    An unclosed \\boxed{ (a truncated answer) is ignored."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    partner = None
    for pos in reversed(starts):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            if partner is None:
                partner = _brace_partners(text)
            end = partner.get(j)
            if end is None:
                continue
            content = text[j + 1:end]
        elif j > pos:                       # "\boxed 5": the next whitespace-free token
            m = _TOKEN_AFTER_BOX_RE.match(text, j)
            content = m.group().rstrip(".,;") if m else ""
        else:
            continue
        if content.strip():
            return content.strip()
    return None


def _clean_sentence_answer(s):
    """'$\\frac{1}{2}$. Done.' -> '\\frac{1}{2}';  '**42**.' -> '42'."""
    s = s.strip().strip("*").strip()
    if s.startswith("$"):
        end = s.find("$", 1)
        s = s[1:end] if end > 0 else s[1:]
    else:
        s = re.split(r"\.(?:\s|$)", s, maxsplit=1)[0]   # cut at the end of the sentence
    return s.strip().strip("*").rstrip(".").strip()


def extract_answer(text):
    """The final answer of a completion as a string, or None.

    Priority: the last \\boxed{...} (braces matched; also \\fbox{...} and `\\boxed 5`), else the
    last "the answer is X", else the last GSM8K-style "#### X". Empty answers count as none.
    """
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_IS_RE, _HASHES_RE):
        last = None
        for last in pattern.finditer(text):
            pass
        if last is not None:
            answer = _clean_sentence_answer(last.group(1))
            if answer:
                return answer
    return None


def _strip_text_commands(s):
    """\\text{cm} after a number is a unit: drop it. \\text{(B)} alone is the answer: unwrap it."""
    for _ in range(20):                                   # bounded: at most 20 \text blocks
        m = re.search(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{", s)
        if m is None:
            return s
        end = _brace_partners(s).get(m.end() - 1)
        if end is None:                                   # unbalanced: drop the command name only
            return s[:m.start()] + s[m.end() - 1:]
        before, inner, after = s[:m.start()], s[m.end():end], s[end + 1:]
        is_unit = (re.search(r"\d", before) and re.fullmatch(r"\s*[A-Za-z][A-Za-z ./]*", inner)
                   and re.fullmatch(r"\s*(?:\^\s*\{?\d\}?)?\s*", after))   # "5 \text{cm}^2" at the end
        s = before if is_unit else before + inner + after
    return s


def _normalise(s):
    """A canonical string for an answer: LaTeX noise, units, '$', '%', degrees and 'x =' removed.
    Returns (string, had_percent)."""
    s = s.strip()
    for a, b in (("−", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "), ("π", "\\pi "),
                 ("°", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\displaystyle", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;: ]|\\q?quad(?![A-Za-z])|~", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", "", s)
    s = re.sub(r"\\[()\[\]]", "", s).replace("\\$", "").replace("$", "")
    had_percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_text_commands(s)
    s = s.rstrip(". ").strip()
    if s.count("=") == 1:                                   # "x = 7" -> "7" (only a short name on the left)
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*\\?[A-Za-z]{1,6}(?:_\{?[A-Za-z0-9]+\}?)?\s*", lhs):
            s = rhs.strip()
    m = re.fullmatch(r"(-?[\d.,]*\d)\s+[A-Za-z]+(?:\s+[A-Za-z]+)*", s)   # "18 dollars" -> "18"
    if m:
        s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):     # thousands separators: 1,234,567
        s = s.replace(",", "")                                # (but "1,23" and "1, 234" are lists)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)       # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)               # .5 -> 0.5
    s = re.sub(r"(\d\.\d*?)0+(?![\d])", r"\1", s)             # 2.50 -> 2.5
    s = re.sub(r"(\d)\.(?![\d])", r"\1", s)                   # 3. -> 3
    m = re.fullmatch(r"\(?([A-Z])\)", s) or re.fullmatch(r"\(([A-Z])\)?", s)   # (B) -> B
    if m:
        s = m.group(1)
    return s, had_percent


class _NotANumber(Exception):
    pass


_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|\\[A-Za-z]+|\S")


def _to_number(s):
    """Value of a simple numeric expression, or None. A recursive-descent parser, no eval():
        expr   := term (('+' | '-') term)*
        term   := unary (('*' | '/' | \\cdot | \\times | \\div) unary | implicit-product)*
        unary  := ('-' | '+') unary | power
        power  := atom ('^' unary)?
        atom   := number | '(' expr ')' | '{' expr '}' | \\frac{expr}{expr} | \\sqrt{expr} | \\pi
    """
    if len(s) > 200:
        return None
    tokens, pos = _TOKEN_RE.findall(s), 0
    closing = {"(": ")", "{": "}"}

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise _NotANumber
        pos += 1
        return tok

    def expr(depth):
        if depth > _MAX_DEPTH:
            raise _NotANumber
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth):
        value = unary(depth)
        while True:
            tok = peek()
            if tok in ("*", "\\cdot", "\\times"):
                take()
                value *= unary(depth)
            elif tok in ("/", "\\div"):
                take()
                value /= unary(depth)                      # ZeroDivisionError is caught below
            elif tok in ("(", "{", "\\frac", "\\sqrt", "\\pi"):   # 2\pi, 3\sqrt{2}, 2(3)
                value *= unary(depth)
            else:
                return value

    def unary(depth):
        if peek() in ("-", "+"):
            return -unary(depth + 1) if take() == "-" else unary(depth + 1)
        return power(depth)

    def power(depth):
        base = atom(depth)
        if peek() != "^":
            return base
        take()
        exponent = unary(depth + 1)
        if abs(exponent) > _MAX_EXPONENT or (base == 0 and exponent < 0):
            raise _NotANumber
        value = base ** exponent                           # floats: overflow raises, never hangs
        if isinstance(value, complex):
            raise _NotANumber
        return value

    def braced(depth):
        take("{")
        value = expr(depth + 1)
        take("}")
        return value

    def atom(depth):
        if depth > _MAX_DEPTH:
            raise _NotANumber
        tok = take()
        if tok[0].isdigit():
            return float(tok)
        if tok in closing:
            value = expr(depth + 1)
            take(closing[tok])
            return value
        if tok == "\\frac":
            num, den = braced(depth), braced(depth)
            return num / den
        if tok == "\\sqrt":
            value = braced(depth)
            if value < 0:
                raise _NotANumber
            return math.sqrt(value)
        if tok == "\\pi":
            return math.pi
        raise _NotANumber

    try:
        value = expr(0)
        if pos != len(tokens) or not math.isfinite(value):
            return None
        return float(value)
    except (_NotANumber, ArithmeticError, ValueError, RecursionError):
        return None


def _split_top_level(s):
    """Split at commas outside any bracket. '(1,(2,3))' inner -> ['1', '(2,3)']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _bracketed(s):
    """'(1,2]' -> ('(', ']', '1,2') when one bracket pair encloses the whole string, else None."""
    s = s.replace("\\{", "{").replace("\\}", "}")
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return None
    depth = 0
    for i, ch in enumerate(s[:-1]):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0:                                     # closed before the end: "(1)+(2)"
            return None
    return s[0], s[-1], s[1:-1]


def _numbers_equal(a, b):
    return a == b or abs(a - b) <= _REL_TOL * max(abs(a), abs(b))


def _equiv(a, a_pct, b, b_pct, depth=0):
    """Equivalence of two normalised answers (see is_equiv)."""
    if a == b:
        return True
    if depth > 3:
        return False
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        xs = (x, x / 100) if a_pct else (x,)               # 25% may mean 25 or 0.25
        ys = (y, y / 100) if b_pct else (y,)
        return any(_numbers_equal(u, v) for u in xs for v in ys)
    pa, pb = _bracketed(a), _bracketed(b)
    if pa and pb:                                          # tuples, intervals, sets: element by element
        ea, eb = _split_top_level(pa[2]), _split_top_level(pb[2])
        return (pa[:2] == pb[:2] and len(ea) == len(eb) and len(ea) > 1
                and all(_equiv(u, False, v, False, depth + 1) for u, v in zip(ea, eb)))
    if not pa and not pb and "," in a and "," in b:       # "1, 2" vs "2,1": unordered lists of answers
        ea, eb = _split_top_level(a), _split_top_level(b)
        if len(ea) != len(eb) or len(ea) > 50:
            return False
        unused = list(eb)
        for u in ea:
            hit = next((v for v in unused if _equiv(u, False, v, False, depth + 1)), None)
            if hit is None:
                return False
            unused.remove(hit)
        return True
    return False


def _math_verify_equiv(pred, gold):
    try:
        import math_verify
    except ImportError:
        raise ImportError("--checker math-verify needs the math-verify package: "
                          "pip install 'math-verify[antlr4_13_2]'") from None
    # math-verify's argument order matters: gold first. Boxing both makes their extractor take them whole.
    return bool(math_verify.verify(math_verify.parse(f"\\boxed{{{gold}}}"),
                                   math_verify.parse(f"\\boxed{{{pred}}}")))


CHECKERS = ("builtin", "math-verify")


def is_equiv(pred, gold, checker="builtin"):
    """True when two answer strings mean the same thing (pred: the model's, gold: the reference).

    Normalises LaTeX (\\left/\\right, \\dfrac, \\frac12, spaces, \\text{} units, \\$, \\%, ^\\circ,
    trailing zeros, thousands separators like 1,234,567) and "x = 7" prefixes; then numbers are
    equal within a relative 1e-4 (0.5 == \\frac{1}{2}, 25\\% == 0.25), tuples and intervals are
    compared element by element, simple powers and products (2^{10}, 3\\cdot 4) are evaluated
    without eval(); otherwise normalised string equality. Never raises on any input; the only
    exception is an ImportError for checker="math-verify" when that package is missing.
    """
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; choose one of {CHECKERS}")
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if checker == "math-verify":
        try:
            return _math_verify_equiv(pred, gold)
        except ImportError:
            raise
        except Exception:
            return False
    try:
        if len(pred) > _MAX_ANSWER_CHARS or len(gold) > _MAX_ANSWER_CHARS:
            return pred.strip() == gold.strip()
        return _equiv(*_normalise(pred), *_normalise(gold))
    except Exception:                                      # a checker bug must not crash a training run
        return False


def math_reward(completion, gold, *, checker="builtin", format_reward=0.0):
    """1.0 when the completion's extracted answer is equivalent to gold, else 0.0.
    With format_reward > 0 (off by default), a wrong answer that is at least \\boxed earns it."""
    pred = extract_answer(completion)
    if pred is not None and is_equiv(pred, gold, checker):
        return 1.0
    if format_reward and isinstance(completion, str) and _last_boxed(completion) is not None:
        return float(format_reward)
    return 0.0


def grpo_reward_fn(completions, answer, **kwargs):
    """Drop-in reward function for TRL's GRPOTrainer (dataset column "answer"):
    GRPOTrainer(..., reward_funcs=[grpo_reward_fn]). Completions may be strings or chat messages."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [math_reward(t, a) for t, a in zip(texts, answer)]


# ----------------------------------------------------------------------------
# 2. Rollouts
#
# Prompts are left padded so that every prompt ends in the same column and the completions start
# together. A completion ends at its FIRST end-of-sequence token: that token is kept (the model
# must learn to stop), everything after it is not. The pad id is never used to find the end:
# several tokenizers have pad == eos, so "not pad" would cut at the wrong place or not at all.

def completion_mask_from_eos(completion_ids, eos_ids):
    """mask (B, T) bool: True up to and including the first EOS; truncated (B,) bool: no EOS at all.

    >>> mask, truncated = completion_mask_from_eos(torch.tensor([[5, 2, 2], [5, 6, 7]]), [2])
    >>> mask.int().tolist(), truncated.tolist()
    ([[1, 1, 0], [1, 1, 1]], [False, True])
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))  # (B, T)
    eos_before = is_eos.cumsum(dim=1) - is_eos.long()      # (B, T) EOS tokens strictly before t
    mask = eos_before == 0                                 # (B, T) t is at or before the first EOS
    truncated = ~is_eos.any(dim=1)                         # (B,)
    return mask, truncated


def stop_token_ids(model, tokenizer):
    """Every id that ends a completion: the tokenizer's eos and end-of-turn tokens, and the model's
    generation_config.eos_token_id (an int or a list). Never the pad id."""
    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if not ids:
        raise ValueError("the tokenizer and the model define no end-of-sequence token")
    return sorted(ids)


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=0.0, top_p=1.0,
                         batch_size=None, seed=None):
    """Complete each prompt (a list of token ids) once; temperature 0 means greedy.

    Returns one dict per prompt: completion_ids (up to and including the first EOS), text (decoded
    without special tokens) and truncated (no EOS within max_new_tokens). With a seed, batch b is
    sampled after torch.manual_seed(seed + b): the same call gives the same completions.
    Sampling settings are passed explicitly, so a checkpoint's generation_config (top_k=20,
    repetition_penalty=1.1 for Qwen chat models) cannot change what the policy samples.
    """
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    batch_size = batch_size or len(prompt_ids)
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    was_training = model.training
    model.eval()
    results = []
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        if seed is not None:
            torch.manual_seed(seed + b)
        input_ids, attention_mask = pad_left(prompt_ids[start:start + batch_size], pad_id)  # (b, P)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                             repetition_penalty=1.0, use_cache=True, **sampling)   # (b, P + T)
        completions = out[:, input_ids.shape[1]:].cpu()     # (b, T) T <= max_new_tokens
        mask, truncated = completion_mask_from_eos(completions, eos_ids)
        for row, n, cut in zip(completions, mask.sum(dim=1).tolist(), truncated.tolist()):
            ids = row[:n].tolist()
            results.append({"completion_ids": ids, "truncated": cut,
                            "text": tokenizer.decode(ids, skip_special_tokens=True)})
    model.train(was_training)
    return results


def rollout_tensors(prompt_ids, completion_ids, pad_id):
    """Training tensors for B (prompt, completion) pairs: the prompt block is left padded and the
    completion block right padded, so every completion starts at the same column P.

    Returns input_ids, attention_mask, position_ids (B, P + T), completion ids (B, T), the loss
    mask (B, T) (the completion tokens, cut at their first EOS already) and P."""
    prompts, prompt_attn = pad_left(prompt_ids, pad_id)               # (B, P)
    completions, completion_attn = pad_right(completion_ids, pad_id)  # (B, T)
    input_ids = torch.cat([prompts, completions], dim=1)              # (B, P + T)
    attention_mask = torch.cat([prompt_attn, completion_attn], dim=1)  # (B, P + T)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)    # (B, P + T) as generate counts them
    return input_ids, attention_mask, position_ids, completions, completion_attn.bool(), prompts.shape[1]


# ----------------------------------------------------------------------------
# 3. The loss
#
# Everything here is tensors in, tensors out (torch only), to be read and pasted.

def group_advantages(rewards, group_size, *, scale_by_std=True, eps=1e-4):
    """Group-normalised advantages for G completions per prompt (rewards grouped consecutively).

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)     (std with Bessel's correction, as TRL)
        A_i =  r_i - mean_group(r)                             (scale_by_std=False: Dr. GRPO)

    Returns advantages (N,) and informative (N // G,) bool: False for groups whose rewards are all
    equal, which have zero advantage and carry no signal.
    """
    r = rewards.float().view(-1, group_size)                           # (P, G)
    advantages = r - r.mean(dim=1, keepdim=True)                       # (P, G)
    if scale_by_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)   # (P, G)
    informative = r.max(dim=1).values > r.min(dim=1).values            # (P,)
    return advantages.view(-1), informative


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token) under the SAMPLING distribution softmax(logits / temperature), and its entropy.

    logits (B, T, V) are already aligned with tokens (B, T): logits[:, t] scores tokens[:, t].
    Returns logprobs (B, T) (with grad) and entropy (B, T) (detached, for logging)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)    # (B, T, V)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)        # (B, T)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)                     # (B, T)  H = -sum_v p log p
    return chosen, entropy


LOSS_AGGS = ("token-mean", "seq-mean", "dr-grpo")


def loss_normaliser(mask, loss_agg, max_new_tokens):
    """The denominator of the loss, computed ONCE per optimiser step from the masks of ALL its
    completions, so that splitting the step into micro-batches never changes the update.
        token-mean: completion tokens in the step (every token weighs the same)
        seq-mean:   completions in the step (each completion's tokens are first averaged)
        dr-grpo:    completions x max_new_tokens (a constant: no length bias, Dr. GRPO)
    mask (N, T) bool."""
    if loss_agg == "token-mean":
        return max(mask.sum().item(), 1)
    if loss_agg == "seq-mean":
        return max(mask.any(dim=1).sum().item(), 1)
    if loss_agg == "dr-grpo":
        return max(mask.shape[0] * max_new_tokens, 1)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}; choose one of {LOSS_AGGS}")


def policy_loss(logprobs, old_logprobs, advantages, mask, *, normaliser, loss_agg="token-mean",
                clip_eps=0.2, clip_eps_high=None, ref_logprobs=None, kl_coef=0.0):
    """Clipped policy-gradient loss with an optional k3 KL penalty, for one micro-batch.

    logprobs (B, T) current policy, with grad; old_logprobs (B, T) the policy that sampled, detached
    (with one update per batch they are logprobs.detach(): ratio 1, and the gradient is exactly
    REINFORCE's A * grad log pi); ref_logprobs (B, T) the frozen start; advantages (B,); mask (B, T).
    Returns the loss (already divided by the step's normaliser: micro-batch losses simply add up)
    and sums for logging.
    """
    mask = mask.float()                                                # (B, T)
    adv = advantages.unsqueeze(1)                                      # (B, 1) every token gets its sequence's A
    ratio = torch.exp(logprobs - old_logprobs)                         # (B, T) pi / pi_old
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # L_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    unclipped = ratio * adv                                            # (B, T)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv         # (B, T)
    per_token = -torch.min(unclipped, clipped)                         # (B, T)
    kl = torch.zeros_like(logprobs)
    if kl_coef:
        # k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1  (>= 0, unbiased)
        log_r = ref_logprobs - logprobs                                # (B, T)
        kl = torch.exp(log_r) - log_r - 1                              # (B, T)
        per_token = per_token + kl_coef * kl
    if loss_agg == "seq-mean":
        weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1)   # (B, T) each completion sums to 1
    else:
        weights = mask                                                 # (B, T) every token weighs 1
    loss = (per_token * weights).sum() / normaliser
    with torch.no_grad():
        stats = {"tokens": mask.sum().item(),
                 "clipped_tokens": ((clipped < unclipped).float() * mask).sum().item(),
                 "kl_sum": (kl * mask).sum().item()}
    return loss, stats


# ----------------------------------------------------------------------------
# 4. The loop: sample G completions per prompt, score them, update, log, evaluate, checkpoint

def digits_reward(completion, gold):
    """A toy dense reward: the fraction of characters that are digits. A random tiny model can
    learn it in a few dozen steps, so the offline sanity run and the tests see learning happen."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def train_eval_sets(data, eval_size, seed):
    """(training questions, held-out questions) for --data.

    gsm8k and synthetic have separate training and test splits; anything else (math500, a local
    .jsonl) is shuffled with the seed and its first eval_size rows are held out."""
    splits = {"gsm8k": ("gsm8k-train", "gsm8k"), "gsm8k-train": ("gsm8k-train", "gsm8k"),
              "synthetic": ("synthetic-train", "synthetic"), "synthetic-train": ("synthetic-train", "synthetic")}
    if data in splits:
        train_name, eval_name = splits[data]
        return load_qa(train_name, seed=seed), (load_qa(eval_name, limit=eval_size, seed=seed) if eval_size else [])
    rows = load_qa(data, seed=seed)
    random.Random(seed).shuffle(rows)
    return rows[eval_size:], rows[:eval_size]


def evaluate_accuracy(model, tokenizer, rows, args, autocast):
    """Greedy held-out accuracy with the same checker as the reward."""
    prompts = [encode_prompt(tokenizer, r["question"], args.system_prompt) for r in rows]
    with autocast():
        outputs = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                       batch_size=args.eval_batch_size)
    return sum(math_reward(o["text"], r["answer"], checker=args.checker) for o, r in zip(outputs, rows)) / len(rows)


def sequence_logprobs(model, batch, temperature):
    """Per-token log-probs (B, T) and entropies (B, T) of the completion tokens of a rollout batch."""
    input_ids, attention_mask, position_ids, completions, _, _ = batch
    T = completions.shape[1]
    # logits_to_keep = T + 1: only the positions P-1 .. P+T-1 are projected onto the vocabulary.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1).logits                   # (B, T + 1, V)
    # the causal shift: logits[:, t] predicts input_ids[:, t + 1], so the first T rows score the completion
    return token_logprobs(logits[:, :-1], completions, temperature)


def rl_step(model, ref_model, optimizer, prompts, rollouts, advantages, args, pad_id, device, autocast):
    """--ppo-epochs optimiser steps on one batch of rollouts. Returns summed statistics."""
    batch = rollout_tensors(prompts, [r["completion_ids"] for r in rollouts], pad_id)
    mask = batch[4]                                                     # (N, T)
    normaliser = loss_normaliser(mask, args.loss_agg, args.max_new_tokens)   # once per optimiser step
    micro = [slice(s, s + args.micro_batch_size) for s in range(0, len(rollouts), args.micro_batch_size)]

    def micro_batch(sl):
        return tuple(t[sl].to(device) for t in batch[:5]) + (batch[5],)

    # log-probs of the sampling policy (needed when the batch is reused) and of the frozen start
    old, ref = [None] * len(micro), [None] * len(micro)
    with torch.no_grad(), autocast():
        for i, sl in enumerate(micro):
            if args.ppo_epochs > 1:
                old[i] = sequence_logprobs(model, micro_batch(sl), args.temperature)[0]
            if ref_model is not None:
                ref[i] = sequence_logprobs(ref_model, micro_batch(sl), args.temperature)[0]
    sums = {"tokens": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0, "loss": 0.0,
            "grad_norm": 0.0, "train_tokens": 0}
    for epoch in range(args.ppo_epochs):
        for i, sl in enumerate(micro):
            mb = micro_batch(sl)
            with autocast():
                logprobs, entropy = sequence_logprobs(model, mb, args.temperature)   # (b, T) each
            mb_mask = mb[4]
            loss, stats = policy_loss(logprobs, old[i] if old[i] is not None else logprobs.detach(),
                                      advantages[sl].to(device), mb_mask, normaliser=normaliser,
                                      loss_agg=args.loss_agg, clip_eps=args.clip_eps,
                                      clip_eps_high=args.clip_eps_high, ref_logprobs=ref[i],
                                      kl_coef=args.kl_coef)
            loss.backward()
            sums["clipped_tokens"] += stats["clipped_tokens"]
            sums["loss"] += loss.item() / args.ppo_epochs
            sums["train_tokens"] += int(mb[1].sum())
            if epoch == 0:                       # entropy and KL of the policy that sampled this batch
                sums["tokens"] += stats["tokens"]
                sums["kl_sum"] += stats["kl_sum"]
                sums["entropy_sum"] += (entropy * mb_mask).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        sums["grad_norm"] += float(grad_norm) / args.ppo_epochs
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums


def train(args, reward_fn=None):
    """The RL loop. reward_fn(completion_text, gold) -> float overrides --reward (tests use this).
    Returns (model, tokenizer, list of per-step metric dicts)."""
    from tqdm import tqdm
    run_args = vars(args).copy()
    set_seed(args.seed)
    device, amp_dtype, why = pick_device(args.device, args.precision)
    print(f"device: {device} ({why})")
    autocast = lambda: torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    if args.checker == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise UserError("--checker math-verify needs the math-verify package: "
                            "pip install 'math-verify[antlr4_13_2]'") from None
    if reward_fn is None:
        reward_fn = (digits_reward if args.reward == "digits" else
                     lambda text, gold: math_reward(text, gold, checker=args.checker,
                                                    format_reward=args.format_reward))

    # data first: a bad file fails in a second, before any model is loaded
    train_rows, eval_rows = train_eval_sets(args.data, args.eval_size, args.seed)
    if len(train_rows) < args.prompts_per_step:
        raise UserError(f"--data {args.data} has {len(train_rows)} training questions, fewer than "
                        f"--prompts-per-step {args.prompts_per_step}")
    steps_per_epoch = len(train_rows) // args.prompts_per_step
    print(f"data: {len(train_rows)} training questions, {len(eval_rows)} held out; "
          f"{args.prompts_per_step} prompts x {args.group_size} completions per step; reward {args.reward}")

    # the policy (possibly resumed) and, only with --kl-coef > 0, the frozen starting model
    resume_from = latest_checkpoint(args.output_dir) if args.resume else None
    if args.resume and resume_from is None:
        print(f"resume: no checkpoint in {args.output_dir}, starting fresh")
    model, tokenizer = load_model_and_tokenizer(resume_from or args.model, device, seed=args.seed)
    ref_model = None
    if args.kl_coef > 0:   # the START of this run's training, also when resuming
        ref_model = load_model_and_tokenizer(args.model, device, seed=args.seed)[0]
        ref_model.to(amp_dtype or torch.float32).eval().requires_grad_(False)
    print(f"model: {resume_from or args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters; stop tokens {stop_token_ids(model, tokenizer)}; "
          + ("reference model loaded for the KL penalty" if ref_model is not None else "no reference model (--kl-coef 0)"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)
    start_step = 0
    if resume_from:
        saved = torch.load(os.path.join(resume_from, "optimizer.pt"), weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            start_step = json.load(f)["step"]
        print(f"resume: from {resume_from} at step {start_step}")

    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "args.json"), run_args)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if eval_rows and start_step == 0:
        accuracy = evaluate_accuracy(model, tokenizer, eval_rows, args, autocast)
        append_jsonl(metrics_path, {"step": 0, "eval_accuracy": accuracy})
        print(f"step     0 | held-out accuracy {accuracy:.3f} ({len(eval_rows)} questions, greedy)")

    history = []
    model.train()
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc="rl",
               dynamic_ncols=True)
    for step in bar:
        # 1. this step's prompts: a seeded shuffle per epoch, so --resume picks up the same order
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(train_rows)))
        random.Random(args.seed + epoch).shuffle(order)
        rows = [train_rows[j] for j in order[i * args.prompts_per_step:(i + 1) * args.prompts_per_step]]
        prompts = [encode_prompt(tokenizer, r["question"], args.system_prompt)
                   for r in rows for _ in range(args.group_size)]      # G copies of each prompt, adjacent
        golds = [r["answer"] for r in rows for _ in range(args.group_size)]

        # 2. rollouts, seeded per step: the same step samples the same completions after a resume
        t0 = time.perf_counter()
        with autocast():
            rollouts = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                            temperature=args.temperature, top_p=args.top_p,
                                            batch_size=args.gen_batch_size, seed=args.seed * 1_000_003 + step)
        gen_seconds = time.perf_counter() - t0
        rewards = torch.tensor([float(reward_fn(r["text"], g)) for r, g in zip(rollouts, golds)])   # (N,)
        correct = [is_equiv(extract_answer(r["text"]), g, args.checker) for r, g in zip(rollouts, golds)]

        # 3. advantages; groups whose rewards are all equal are skipped
        advantages, informative = group_advantages(rewards, args.group_size, scale_by_std=not args.no_std)
        trained = informative.repeat_interleave(args.group_size)           # (N,)
        if args.mask_truncated:                 # still part of their group's mean, but no loss of their own
            trained &= ~torch.tensor([r["truncated"] for r in rollouts])
        keep = trained.nonzero().flatten().tolist()
        t1 = time.perf_counter()
        sums = {}
        if keep:
            sums = rl_step(model, ref_model, optimizer, [prompts[k] for k in keep], [rollouts[k] for k in keep],
                           advantages[keep], args, tokenizer.pad_token_id, device, autocast)
        train_seconds = time.perf_counter() - t1

        # 4. metrics: one JSON line per step
        lengths = [len(r["completion_ids"]) for r in rollouts]
        tokens = max(sums.get("tokens", 0), 1)
        record = {"step": step + 1, "reward": rewards.mean().item(), "accuracy": sum(correct) / len(correct),
                  "response_length": sum(lengths) / len(lengths),
                  "truncated_frac": sum(r["truncated"] for r in rollouts) / len(rollouts),
                  "entropy": sums["entropy_sum"] / tokens if keep else None,
                  "kl": sums["kl_sum"] / tokens if keep and ref_model is not None else None,
                  "clip_frac": sums["clipped_tokens"] / (tokens * args.ppo_epochs) if keep else None,
                  "loss": sums.get("loss"), "grad_norm": sums.get("grad_norm"),
                  "skipped_groups": int((~informative).sum()), "groups": len(rows),
                  "gen_tokens_per_s": sum(lengths) / gen_seconds,
                  "train_tokens_per_s": sums["train_tokens"] / train_seconds if keep else None}
        history.append(record)
        append_jsonl(metrics_path, record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        if (step + 1) % args.log_every == 0:
            tqdm.write(f"step {step + 1:5d} | reward {record['reward']:.3f} | acc {record['accuracy']:.3f} | "
                       f"len {record['response_length']:.0f} | trunc {record['truncated_frac']:.2f} | "
                       f"skipped {record['skipped_groups']}/{len(rows)} | "
                       + (f"H {record['entropy']:.3f} | clip {record['clip_frac']:.3f} | " if keep else "")
                       + (f"KL {record['kl']:.4f} | " if record["kl"] is not None else "")
                       + f"gen {record['gen_tokens_per_s']:.0f} tok/s")
        if args.print_every and (step + 1) % args.print_every == 0:
            for k in sorted({int(rewards.argmax()), int(rewards.argmin())}):   # the best and the worst
                text = rollouts[k]["text"]
                tqdm.write(f"--- sample {k} | gold {golds[k]} | extracted {extract_answer(text)!r} | "
                           f"reward {rewards[k]:.3f}\n{text[:800]}{' [...]' if len(text) > 800 else ''}")

        # 5. held-out accuracy and checkpoints
        done = step + 1 == args.max_steps
        if eval_rows and (done or (args.eval_every and (step + 1) % args.eval_every == 0)):
            accuracy = evaluate_accuracy(model, tokenizer, eval_rows, args, autocast)
            append_jsonl(metrics_path, {"step": step + 1, "eval_accuracy": accuracy})
            record["eval_accuracy"] = accuracy
            tqdm.write(f"step {step + 1:5d} | held-out accuracy {accuracy:.3f}")
        if done or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(args.output_dir, model, tokenizer, run_args, {"step": step + 1}, optimizer)
            prune_checkpoints(args.output_dir, args.keep_checkpoints)
    bar.close()
    export_model(args.output_dir, model, tokenizer, run_args)
    print(f"done: model in {args.output_dir}; metrics in {metrics_path}; "
          f"evaluate with: python evaluate.py --model {args.output_dir}")
    return model, tokenizer, history


TINY_DEFAULTS = dict(data="synthetic", reward="digits", lr=1e-3, group_size=8, prompts_per_step=4,
                     max_new_tokens=32, micro_batch_size=32, max_steps=20, eval_size=16, print_every=5)
HUB_DEFAULTS = dict(data="gsm8k", reward="math", lr=1e-6, group_size=8, prompts_per_step=16,
                    max_new_tokens=1024, micro_batch_size=4, max_steps=300, eval_size=200, print_every=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL with verifiable rewards (GRPO-style) for math reasoning.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="checkpoint dir | hub id | short name (Qwen2.5-0.5B) | tiny")
    p.add_argument("--data", default=None, help="gsm8k (train split; its test split is held out) | math500 | "
                   "synthetic | local .jsonl with question and answer (default: synthetic for tiny, gsm8k)")
    p.add_argument("--output-dir", default=None, help="checkpoints, metrics.jsonl and the final model "
                   "(default runs/rl-{model})")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="system turn of every prompt ('' for none)")
    # reward
    p.add_argument("--reward", default=None, choices=["math", "digits"], help="math: 1 if the answer is "
                   "right; digits: toy dense reward for sanity runs (default: digits for tiny, math)")
    p.add_argument("--checker", default="builtin", choices=CHECKERS, help="answer equivalence backend")
    p.add_argument("--format-reward", type=float, default=0.0, help="reward for a wrong but \\boxed answer")
    # rollouts
    p.add_argument("--group-size", "-G", type=int, default=None, help="completions per prompt (8)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per optimiser step (16; 4 tiny)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion budget (1024; 32 tiny)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also used in the loss)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--gen-batch-size", type=int, default=None, help="sequences per generate call (default all)")
    p.add_argument("--mask-truncated", action="store_true", help="no loss on completions without an EOS")
    # loss
    p.add_argument("--no-std", action="store_true", help="advantage r - mean, not divided by std (Dr. GRPO)")
    p.add_argument("--loss-agg", default="token-mean", choices=LOSS_AGGS, help="how token losses are averaged")
    p.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch; 1 = REINFORCE with group baseline")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip epsilon (lower, and upper by default)")
    p.add_argument("--clip-eps-high", type=float, default=None, help="separate upper epsilon (DAPO uses 0.28)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL penalty to the starting model (0: none)")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-6; 1e-3 tiny)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--micro-batch-size", type=int, default=None, help="completions per forward pass (4; 32 tiny)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (300; 20 tiny)")
    # run
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast or fp32")
    p.add_argument("--seed", type=int, default=0, help="seed for the tiny model, prompt order and sampling")
    p.add_argument("--eval-size", type=int, default=None, help="held-out questions (200; 16 tiny; 0: none)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out accuracy every N steps (and at start/end)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="sequences per generate call in evaluation")
    p.add_argument("--log-every", type=int, default=1, help="print a metrics line every N steps")
    p.add_argument("--print-every", type=int, default=None, help="print the best and worst completion every N "
                   "steps (10; 5 tiny; 0: never)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep the N newest checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    args = p.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.model == "tiny" else HUB_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.group_size < 2:
        p.error("--group-size must be at least 2: the advantage compares completions of one prompt")
    if args.ppo_epochs < 1 or args.temperature <= 0:
        p.error("--ppo-epochs must be >= 1 and --temperature > 0 (RL samples; evaluation is greedy)")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"rl-{os.path.basename(args.model.rstrip('/'))}")
    return args


if __name__ == "__main__":
    try:
        train(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
