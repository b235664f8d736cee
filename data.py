"""
data.py: the data side of eksft. Loads SFT conversations and question/answer sets, reads the
final answer a text states (and spells it one canonical way, for the answer checker in rl.py),
turns a conversation into token ids plus a loss mask, and groups examples into batches.

    python data.py --data synthetic --num-samples 3   # print a few rows as chat turns

Row formats read from a hub dataset or a local .jsonl / .json (an array, or JSON Lines as
`datasets`' to_json writes) / .parquet file:
  SFT (load_conversations):
  1. OpenAI       {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  2. ShareGPT     {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  3. pairs        {"problem": ..., "solution": ...} (MATH-500) or {"question": ..., "answer": ...}
                  (GSM8K: the answer's "#### 42" becomes "The answer is \\boxed{42}.")
  4. OpenR1-Math  {"problem", "generations", "correctness_math_verify", ...}: problem + the first
                  generation that is correct and complete, as the openr1-3k alias reads it
  Question/answer sets (load_qa): the question from 'question' or 'problem', the gold from
  'answer' (GSM8K's worked solution: the text after its last "####").
Aliases: openr1-3k (the paper's low-data setting), gsm8k, math500, synthetic.

Choices made here (and why):
  1. A conversation without a system turn gets SYSTEM_PROMPT, so SFT, RL and evaluation all
     show the model one prompt format. An empty one ('', rl.py --system-prompt '') is no system
     turn at all: render also drops the default one a chat template writes when a conversation
     has none (SmolLM2's and Qwen2.5's do).
  2. Examples longer than --max-len are DROPPED by default, not truncated: a cut chain of thought
     loses its final answer, and imitating half a solution teaches the model to stop mid-way.
     The count dropped is printed. The released EKSFT recipe truncates instead (at 20,000
     tokens): build_sft_examples(too_long="truncate"). openr1_rows says how many it drops.
  3. Labels cover the assistant turns up to and including their end-of-turn token; everything
     else (system, user, template glue such as the newline after <|im_end|>) is ignore_index.
"""
import argparse
import itertools
import json
import os
import random
import re
import sys
from typing import NamedTuple

import torch

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
IGNORE_INDEX = -100
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


class UserError(Exception):
    """A problem the user can fix (bad file, unknown name, no network): printed as one line."""


class DataError(UserError):
    """Bad input data. The message names the file, the 1-based row and what is wrong."""


# -----------------------------------------------------------------------------
# Rows to conversations (list of {"role", "content"})
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "model": "assistant"}


def row_to_messages(row, where, system_prompt=SYSTEM_PROMPT):
    """One row in any supported format -> a checked conversation. `where` is "file, row N"."""
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: turn {i} of '{key}' is not an object")
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if role not in ROLE_NAMES:
                raise DataError(f"{where}: turn {i} has unknown role {role!r}")
            messages.append({"role": ROLE_NAMES[role], "content": content})
    else:
        for q_key, a_key in (("problem", "solution"), ("question", "answer")):
            if q_key in row and a_key in row:
                answer = row[a_key]
                if a_key == "answer" and isinstance(answer, str) and "####" in answer:
                    answer = gsm8k_solution(answer)       # GSM8K: "steps\n#### 42"
                messages = [{"role": "user", "content": row[q_key]},
                            {"role": "assistant", "content": answer}]
                break
        else:
            raise DataError(f"{where}: expected 'messages', 'conversations', problem/solution or "
                            f"question/answer fields, found {sorted(row)[:8]}")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: turn {i} ({m['role']}) content is "
                            f"{type(m['content']).__name__}, not a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: turn {i} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to train on")
    first = next(i for i, m in enumerate(messages, start=1) if m["role"] != "system")
    if messages[first - 1]["role"] != "user":
        raise DataError(f"{where}: turn {first} is the assistant's, but the first turn after the "
                        f"system prompt must be the user's")
    if system_prompt is not None and messages[0]["role"] != "system":   # '': none (render)
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def gsm8k_gold(answer):
    """GSM8K's final answer: the text after the last '####', thousands separators removed ("1,250"
    is also how the pair (1, 250) is written; "1250" is not ambiguous). rl.is_equiv matches it to a
    model's "1,250" or "1250" under every checker (tests/test_data.py).
    >>> gsm8k_gold("5 boxes of 250: 5*250=<<5*250=1250>>1250\\n#### 1,250")
    '1250'
    """
    final = answer.rpartition("####")[2].strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", final):
        final = final.replace(",", "")
    return final


def gsm8k_solution(answer):
    """GSM8K's 'steps\\n#### 42' -> steps ending in \\boxed{42}; calculator marks <<..>> removed."""
    steps = re.sub(r"<<[^>]*>>", "", answer.rpartition("####")[0]).strip()
    return f"{steps}\nThe answer is \\boxed{{{gsm8k_gold(answer)}}}."


def openr1_solution(row):
    """An OpenR1-Math-220k row's first generation that math-verify marked correct and whose
    reasoning is complete (is_reasoning_complete), or None when it has none. A generation only
    the Llama judge marked correct (correctness_llama) is not used: math-verify's verdicts can
    be checked again offline, the judge's cannot."""
    verified = row.get("correctness_math_verify") or []
    complete = row.get("is_reasoning_complete") or [True] * len(verified)
    for generation, ok, done in zip(row.get("generations") or [], verified, complete):
        if ok and done:
            return generation
    return None


def openr1_rows(seed):
    """OpenR1-Math-220k rows in a seeded order, each as (problem, openr1_solution). Read lazily:
    the caller keeps the first 3,000 that fit --max-len (the paper's low-data setting), so only a
    few thousand of the 94k rows are ever decoded.

    How many --max-len 4096 drops, estimated (the card gives sizes, not lengths): 45k complete
    traces of this dataset (the card of 96kevinli29/SFT-Math-45k) have assistant turns of p50
    12,980 and p90 32,888 characters; Qwen2.5's tokenizer reads 3.2-4.4 characters a token on
    R1-style text, so ~3,960 response tokens hold 12,800-17,300 characters, and a log-normal fit
    drops about 41% (35-51%), the longest traces. The released recipe truncates at 20,000 tokens,
    under 1% of them: --too-long truncate --max-len 20000.
    """
    ds = load_hub_rows("open-r1/OpenR1-Math-220k", "default", "train")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    for i in order:
        row = ds[i]
        solution = openr1_solution(row)
        if solution is not None:
            yield i + 1, {"problem": row["problem"], "solution": solution}


def openr1_file_rows(source, rows, log=print):
    """A local OpenR1-Math export (rows with 'generations'): each row as the openr1-3k alias
    reads it, problem + openr1_solution; rows without one are skipped and counted."""
    kept, skipped = [], 0
    for number, row in rows:
        if "generations" not in row:
            kept.append((number, row))
        elif (solution := openr1_solution(row)) is None:
            skipped += 1
        else:
            kept.append((number, {"problem": row.get("problem"), "solution": solution}))
    log(f"{source}: OpenR1-Math rows as problem + the first generation math-verify marked "
        f"correct and complete; {skipped} of {len(rows)} rows have none and are skipped")
    if not kept:
        raise DataError(f"{source}: no row has a generation that is both correct "
                        f"(correctness_math_verify) and complete (is_reasoning_complete)")
    return kept


SFT_ALIASES = ("openr1-3k", "gsm8k", "math500", "synthetic")
QA_ALIASES = ("gsm8k", "gsm8k-train", "math500", "synthetic", "synthetic-train")


def load_conversations(source, seed=0, system_prompt=SYSTEM_PROMPT, log=print):
    """SFT conversations, (where, messages) pairs, from an alias, a hub dataset or a local file.

    Local files and synthetic data come as a list, every row checked up front; hub data sets as a
    lazy iterator, read only as far as the caller goes. `where` names the source and row."""
    kind = source_kind(source, SFT_ALIASES)
    if source == "synthetic":
        rows = [(i, {"problem": r["question"], "solution": r["solution"]})
                for i, r in enumerate(synthetic_train(2000, seed=seed), start=1)]
    elif kind == "file":
        rows = read_local_rows(source)
        if any("generations" in row for _, row in rows):
            rows = openr1_file_rows(source, rows, log)
    elif source == "openr1-3k":
        rows = openr1_rows(seed)
    elif source == "gsm8k":
        rows = enumerate(load_hub_rows("openai/gsm8k", "main", "train"), start=1)
    elif source == "math500":
        rows = enumerate(load_hub_rows("HuggingFaceH4/MATH-500", None, "test"), start=1)
    else:
        rows = enumerate(load_hub_rows(source), start=1)
    conversations = ((f"{source}, row {n}", row_to_messages(row, f"{source}, row {n}",
                                                            system_prompt))
                     for n, row in rows)
    return list(conversations) if isinstance(rows, list) else conversations


# -----------------------------------------------------------------------------
# Question/answer sets for RL and evaluation
QUESTION_COLUMNS = ("question", "problem")  # GSM8K; MATH-500 and OpenR1-Math
ANSWER_COLUMNS = ("answer",)                # all three (GSM8K's is a solution ending "#### 42")


def qa_row(row, where):
    """(question, answer, columns) of one question/answer row; `columns` says where each came
    from, e.g. "question from 'problem', answer from 'answer'"."""
    q_key = next((k for k in QUESTION_COLUMNS if k in row), None)
    a_key = next((k for k in ANSWER_COLUMNS if k in row), None)
    if q_key is None and a_key is None:   # another schema: show what the row has
        raise DataError(f"{where}: missing fields 'question' (or 'problem') and 'answer'; it "
                        f"has {sorted(row)[:8]}")
    if q_key is None or a_key is None:
        raise DataError(f"{where}: missing field " + ("'answer'" if q_key else
                                                      "'question' (or 'problem')"))
    question, answer = row[q_key], row[a_key]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: '{q_key}' must be a non-empty string")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise DataError(f"{where}: '{a_key}' must be a string or a number")
    answer_from = f"'{a_key}'"
    if isinstance(answer, str) and "####" in answer:
        answer, answer_from = gsm8k_gold(answer), f"the text after the last '####' in '{a_key}'"
    return question, str(answer), f"question from '{q_key}', answer from {answer_from}"


def load_qa(source, limit=None, seed=0, log=print):
    """A list of dict(question, answer) from an alias or a local .jsonl/.json/.parquet file.

    Aliases: gsm8k (test), gsm8k-train, math500 (test), synthetic (held-out), synthetic-train.
    A file's rows may be in GSM8K's, MATH-500's or OpenR1-Math's schema (qa_row); one line says
    which columns were read."""
    kind = source_kind(source, QA_ALIASES, "question/answer set", hub=False)
    if source in ("synthetic", "synthetic-train"):
        # held-out (a fixed split of 500, as a test split) and training rows share no question
        rows = (synthetic_train(limit or 500, seed) if source == "synthetic-train"
                else synthetic_held_out(seed)[:limit])
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if source in ("gsm8k", "gsm8k-train"):
        split = "test" if source == "gsm8k" else "train"
        rows = [{"question": r["question"], "answer": gsm8k_gold(r["answer"])}
                for r in load_hub_rows("openai/gsm8k", "main", split)]
    elif source == "math500":
        rows = [{"question": r["problem"], "answer": r["answer"]}
                for r in load_hub_rows("HuggingFaceH4/MATH-500", None, "test")]
    elif kind == "file":
        rows, columns = [], {}
        for number, row in read_local_rows(source):
            question, answer, used = qa_row(row, f"{source}, row {number}")
            rows.append({"question": question, "answer": answer})
            columns[used] = columns.get(used, 0) + 1
        if len(columns) == 1:
            log(f"{source}: {next(iter(columns))}")
        else:
            log(f"{source}: " + "; ".join(f"{n} rows {used}" for used, n in columns.items()))
    return rows[:limit] if limit else rows


def train_eval_sets(data, eval_size, seed):
    """(training questions, held-out questions) for RL. gsm8k and synthetic have their own test
    splits; anything else (math500, a local file) is shuffled with the seed, eval_size held out."""
    name = data.removesuffix("-train")
    if name in ("gsm8k", "synthetic"):
        held_out = load_qa(name, limit=eval_size, seed=seed) if eval_size else []
        return load_qa(f"{name}-train", seed=seed), held_out
    rows = load_qa(data, seed=seed)
    random.Random(seed).shuffle(rows)
    return rows[eval_size:], rows[:eval_size]


# Evaluation protocols (evaluate.py --protocol, rl.py --eval-protocol): what changes a score besides
# the model. Both are zero-shot, with the system prompt of the Qwen2.5-Math harness.
PROTOCOLS = {
    "qwen-math": dict(
        system_prompt=SYSTEM_PROMPT, max_new_tokens=2048, last_number=True,
        about="the Qwen2.5-Math harness behind published numbers (qwen25-math-cot)",
        extraction="the stated answer (extract_answer), else the last formula or number "
                   "(the harness reads the last number only)"),
    "strict": dict(
        system_prompt=SYSTEM_PROMPT, max_new_tokens=1024, last_number=False,
        about="an answer that is not stated (boxed, or after an answer phrase) scores 0",
        extraction="the stated answer (extract_answer), no last-number fallback"),
}


# -----------------------------------------------------------------------------
# Answers: extract_answer reads the final answer a completion (or a gold) states; normalise_answer
# spells it one way per value (rule tables, a comment per rule); rl.is_equiv compares two of them.

MAX_ANSWER_CHARS = 1000   # an "answer" longer than this is compared as a plain string
MAX_BOXED_CHARS = 10_000  # a \boxed{...} longer than this is not an answer
TAIL_CHARS = 20_000       # answer phrases and the last number are looked for in the last 20,000


def extract_answer(text, *, last_number=False):
    """The final answer of a completion as a string, or None (also for an empty answer). Only the
    text after </think> counts, only the inside of the last <answer>...</answer>. The last stated
    answer wins: the last \\boxed{...} (also \\fbox, `\\boxed 5`, boxes joined by "and" or commas)
    or a later "The (final) answer is X" / "Answer: X" that states a value (not "the answer is
    correct"); else the last "#### X" (GSM8K); else, with last_number=True (the Qwen2.5-Math
    harness's fallback; off for RL), the last number in the text."""
    if not isinstance(text, str):
        return None
    text = text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text
    close = text.rfind("</answer>")
    if (opening := text.rfind("<answer>", 0, max(close, 0))) >= 0:
        inner = text[opening + len("<answer>"):close]
        return _marked_answer(inner) or inner.strip() or None
    answer = _marked_answer(text)
    if not answer and (last := _HASHES_RE.match(text, max(text.rfind("####"), 0))):
        answer = _clean_sentence_answer(last.group(1))
    if not answer and last_number:
        numbers = _LAST_NUMBER_RE.findall(text[-TAIL_CHARS:].replace(",", ""))
        answer = numbers[-1] if numbers else None
    return answer or None


# Finding the answer: the last \boxed{...}, else a stated "answer is X", else "#### X".
_BRACE_RE = re.compile(r"[{}]")
_SPACES_RE = re.compile(r"[ \t]*")
_TOKEN_AFTER_BOX_RE = re.compile(r"[^\s$]+")
# "The (final) answer is X", "Final answer: X", "**Answer:** X", "Answer: X", "Answer $X$"
_ANSWER_PHRASE_RE = re.compile(
    r"(?i)\banswer(?:\s+is\b\s*:?|\s*\**\s*[:：]\s*\**|(?=\s*(?:\$|\\\(|\\\[)))")
_LEADING_NUMBER_RE = re.compile(r"[\s*]*(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)(?![\d.]*[\w^{\\(])")
_STATES_A_VALUE_RE = re.compile(r"\s*\**\s*[-$\\\d(\[{]")   # "is 72", "is $x$", not "is correct"
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
# what may separate boxes that form one answer: "\boxed{-2} \quad\text{and}\quad \boxed{1}"
_BOX_GAP_RE = re.compile(
    r"(?:\s|[$,;.]|\\[\[\]()]|\\q?quad|\\[,;: ]|\\text\s*\{\s*(?:and|or|,)?\s*\}|and|or)*")
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")   # the Qwen2.5-Math harness's, on text without commas
# $$x$$, $x$, \(x\), \[x\]: the formulas of a text (math-verify reads the last one)
_MATH_SPAN_RE = re.compile(r"\$\$(.{1,1000}?)\$\$|(?<!\\)\$(.{1,1000}?)(?<!\\)\$"
                           r"|\\\((.{1,1000}?)\\\)|\\\[(.{1,1000}?)\\\]", re.S)


def _closing_brace(text, j):
    """Index of the '}' that closes the '{' at text[j], looking at most MAX_BOXED_CHARS ahead."""
    depth = 0
    for m in _BRACE_RE.finditer(text, j, j + MAX_BOXED_CHARS):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return None


def boxed_answer(text):
    """(start, answer) of the last complete \\boxed{...} / \\fbox{...} / `\\boxed 5`, joined with
    the boxes just before it that form one answer with it (`\\boxed{-2} and \\boxed{1}` -> '-2, 1'),
    or None. An unclosed \\boxed{ (a truncated answer) is skipped; only the last 20 are read."""
    found, before = [], {name: text.rfind(name) for name in ("\\boxed", "\\fbox")}
    for _ in range(20):                                    # from the last box backwards
        name = max(before, key=before.get)
        start = before[name]
        if start < 0:
            break
        before[name] = text.rfind(name, 0, start)
        pos = start + len(name)
        j = _SPACES_RE.match(text, pos).end()
        content = end = None
        if text[j:j + 1] == "{" and (close := _closing_brace(text, j)) is not None:
            content, end = text[j + 1:close], close + 1
        elif j > pos and (m := _TOKEN_AFTER_BOX_RE.match(text, j)):   # "\boxed 5", not \boxedfoo
            content, end = m.group().rstrip(".,;"), m.end()
        if not content or not content.strip():
            continue
        if found and (end > found[-1][0] or found[-1][0] - end > 40
                      or not _BOX_GAP_RE.fullmatch(text, end, found[-1][0])):
            break                                          # nested in it, or words in between
        found.append((start, content.strip()))
    return (found[0][0], ", ".join(c for _, c in reversed(found))) if found else None


def last_formula_or_number(text):
    """The last $...$ / \\(...\\) of a text unless a number follows it, else its last number."""
    formula = None
    for formula in _MATH_SPAN_RE.finditer(text):
        pass
    if formula and not re.search(r"\d", text[formula.end():]):
        return next(filter(None, formula.groups())).strip() or None
    numbers = re.findall(r"-?\d*\.?\d+(?:/\d+)?", text.replace(",", ""))   # 2/3 is one number
    return numbers[-1] if numbers else None


def _clean_sentence_answer(s):
    """'$\\frac{1}{2}$. Done.' -> '\\frac{1}{2}';  '**42**.' -> '42';  '\\[ 9 \\]' -> '9';
    a sentence in words ('The volume of $V$ is 120') -> its last formula or number ('120')."""
    s = s.strip().strip("*").strip()
    for opening, closing in (("$$", r"\$\$"), ("$", r"(?<!\\)\$"), ("\\(", r"\\\)"),
                             ("\\[", r"\\\]")):
        if s.startswith(opening):                          # a formula, perhaps unclosed
            end = re.compile(closing).search(s, len(opening))
            s = s[len(opening):end.start() if end else None]
            break
    else:
        s = re.split(r"\.(?:\s|$)|\n", s, maxsplit=1)[0]   # cut at the end of the sentence
        words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}\b",
                           _MATH_SPAN_RE.sub("", s[:MAX_ANSWER_CHARS]))
        if len(s) <= MAX_ANSWER_CHARS and len(words) >= 2:        # a sentence, not "5 apples"
            s = last_formula_or_number(s) or s
    return re.sub(r"^[\s*]+|[\s*.]+$", "", s)              # markdown bold, the final full stop


def _marked_answer(text):
    """The last box, unless a later answer phrase states a value or says "final" (then the phrase's
    answer); else the last answer phrase; None without either."""
    phrase = None
    for phrase in _ANSWER_PHRASE_RE.finditer(text, max(0, len(text) - TAIL_CHARS)):
        pass
    boxed = boxed_answer(text)
    if phrase and (boxed is None or boxed[0] < phrase.start() and (
            "final" in text[max(0, phrase.start() - 8):phrase.start()].lower()
            or _STATES_A_VALUE_RE.match(text, phrase.end()))):
        after = text[phrase.end():phrase.end() + MAX_BOXED_CHARS]
        # overriding a box, the phrase gives the value it states FIRST ("The answer is 10 apples,
        # 2 more than Tom's 8" is 10), not a sentence's last number
        first = _LEADING_NUMBER_RE.match(after) if boxed else None
        answer = first[1].replace(",", "") if first else _clean_sentence_answer(after)
        if answer:
            return answer
    return boxed[1] if boxed else None


# Normalisation, step 1: LaTeX and notation, (pattern, replacement) applied in this order.
def _repeating_decimal(m):
    """0.1\\overline{6} -> \\frac{15}{90}: (all the digits - those before the repeating n) over
    10^k (10^n - 1), for k digits after the point before the repeating ones."""
    whole, fixed, repeat = m[1] or "0", m[2], m[3]
    return (f"\\frac{{{int(whole + fixed + repeat) - int(whole + fixed)}}}"
            f"{{{10 ** len(fixed) * (10 ** len(repeat) - 1)}}}")


_LATEX_RULES = [(re.compile(p, re.S), r) for p, r in [
    (r"\\\\(?=[A-Za-z])", r"\\"),                               # \\frac: a backslash escaped twice
    (r"[−–]", "-"),                                             # unicode minus and dash
    (r"×", r"\\times "), (r"·", r"\\cdot "), (r"÷", r"\\div "), (r"π", r"\\pi "),
    (r"∞", r"\\infty "), (r"∪", r"\\cup "), (r"≈", r"\\approx "),
    (r"²", "^2"), (r"³", "^3"),
    (r"(\d*)\.(\d{0,50})\\(?:overline|bar)\s*\{(\d{1,50})\}", _repeating_decimal),  # 0.\bar{3}
    (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),                     # \dfrac, \tfrac, \cfrac are \frac
    (r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![A-Za-z])", ""),   # sizing commands
    (r"(?<=\d)(?:\{,\}|,\\!\s?|\\[,!])(?=\d{3}(?!\d))", ","),    # 14{,}916, 2,\!500, 1\,234
    (r"\\[!,;: ]|\\q?quad(?![A-Za-z])|~", " "),                  # LaTeX spacing
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°", ""),   # degrees
    (r"\\[()\[\]]|\\?\$", ""),                                   # math delimiters, dollar signs
    (r"\\(?:leq?|leqslant)(?![A-Za-z])|≤", "<="),                # relations in one spelling
    (r"\\(?:geq?|geqslant)(?![A-Za-z])|≥", ">="),
    (r"\\neq?(?![A-Za-z])|≠", "!="), (r"\\lt(?![A-Za-z])", "<"), (r"\\gt(?![A-Za-z])", ">"),
    (r"\+\s*\\infty|\\infin(?:ity)?(?![A-Za-z])", r"\\infty"),   # +\infty = \infty
    (r",?\s*(?:\\(?:text\w*|mathrm)\s*\{\s*(?:and|or|,)\s*\}|\b(?:and|or)\b)|;", ","),   # 6 and 8
    (r"(\^\{?\d+\}?)\s+(?=\d)", r"\1*"),                          # 2^6 3^5 is a product
    (r"^(-?)(\d+)\s+(\d+)/(\d+)$", r"\1(\2+\3/\4)"),            # mixed number "1 1/2" = 1 + 1/2
    (r"\\+\s*$", ""),                                           # a stray trailing backslash: "185\"
]]
_UNITS = (r"(?:[kcm]m|kg|mg|ml|lbs?|oz|ft|in|yd|mi|mph|hrs?|hours?|mins?|minutes?|secs?|seconds?"
          r"|days?|weeks?|months?|years?|dollars?|cents?|miles?|met(?:er|re)s?|inch(?:es)?|feet"
          r"|foot|pounds?|lit(?:er|re)s?|gallons?|units?|degrees?)")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update((w, 10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty"
                                                       " ninety".split(), 3))
_TENS, _ONES = "|".join(list(_NUMBER_WORDS)[20:]), "|".join(list(_NUMBER_WORDS)[1:10])
# "five" is 5, but "one half", "two thirds", "five million", "zero point five" are not 1, 2, 5, 0
_SCALE_WORDS = (r"(?:hundred|thousand|[mbtr]illion|point|halfs?|halves|quarters?|thirds?|fourths?|"
                r"fifths?|sixths?|sevenths?|eighths?|ninths?|tenths?)s?\b")
_NUMBER_WORDS_RE = (rf"(?i)^(?:({_TENS})(?:[\s-]({_ONES}))?|({'|'.join(_NUMBER_WORDS)}))\b"
                    rf"(?![\s-]*{_SCALE_WORDS})")
# Step 4, once \text, names and glosses are gone: one spelling for one value.
_CANONICAL_RULES = [(re.compile(p), r) for p, r in [
    (_NUMBER_WORDS_RE, lambda m: str(_NUMBER_WORDS[(m[1] or m[3]).lower()]   # twenty-one -> 21
                                     + _NUMBER_WORDS.get(str(m[2]).lower(), 0))),
    (rf"^\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:{_UNITS}\b|\s(?!(?i:{_SCALE_WORDS}))[A-Za-z]+"
     r"(?:\s+[A-Za-z]+)*)\s*"
     r"(?:\^\{?[23]\}?)?\.?\s*$", r"\1"),                        # 10cm^2, 10 weeks -> 10 (not 6xy)
    (r"^\s*-?\d{1,3}(?:,\d{3})+(?:\.\d+)?\s*$", lambda m: m[0].replace(",", "")),   # 1,234
    (r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", ""),                 # spaces, but one between letters
    (r"\\frac(\d)(\d)", r"\\frac{\1}{\2}"),                      # \frac12 -> \frac{1}{2}
    (r"\\frac(\d)\{", r"\\frac{\1}{"),
    (r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}"),
    (r"\\sqrt(\d+)", r"\\sqrt{\1}"),                             # \sqrt2 -> \sqrt{2}
    (r"(\d)\*(?=[A-Za-z\\(])", r"\1"),                           # 2*x -> 2x
    (r"([_^])\{(\w)\}", r"\1\2"),                                # x^{2} -> x^2
    (r"(?<![\d}])\.(\d)", r"0.\1"),                              # .5 -> 0.5
    (r"(\d\.\d*?)0+(?!\d)", r"\1"),                              # 2.50 -> 2.5
    (r"(\d)\.(?!\d)", r"\1"),                                    # 3. -> 3
    (r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$", r"\1(\2+\3/\4)"),  # mixed number 7\frac{1}{2} = 7.5
    (r"^\(([A-Z])\)?$|^([A-Z])\)$", r"\1\2"),                    # choices: (B), B) -> B
    (r"^([^,]*?)\\pm([^,]*)$", r"\1+\2,\1-\2"),                  # 1\pm\sqrt{2}: both signs
    (r"^([^<>=]+)(<=?)[A-Za-z](<=?)([^<>=]+)$",                   # -2 <= x < 7 -> [-2,7)
     lambda m: f"{'[' if m[2] == '<=' else '('}{m[1]},{m[4]}{']' if m[3] == '<=' else ')'}"),
    (r"^([^<>=A-Za-z]+)([<>])(=?)([A-Za-z])$",                      # 5 >= x -> x <= 5
     lambda m: f"{m[4]}{'<' if m[2] == '>' else '>'}{m[3]}{m[1]}"),
    (r"^[A-Za-z]([<>])(=?)([^<>=]+)$",                            # x > 5 -> (5,\infty)
     lambda m: (f"{'[' if m[2] else '('}{m[3]},\\infty)" if m[1] == ">"
                else f"(-\\infty,{m[3]}{']' if m[2] else ')'}")),
]]
_TEXT_COMMAND_RE = re.compile(r"\\(?:text\w*|math(?:rm|bf|it|sf)|mbox|hbox|operatorname)\s*\{")
_MATRIX_RE = re.compile(r"(?:\\left\s*[\[(]\s*)?\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?"
                        r"(.*?)\\end\{\1\}(?:\s*\\right\s*[\])])?", re.S)
# x, a_{n+1}, \theta, f^{-1}(x), f'(x), P(A), \angle ABC, \overline{AB}
_NAME = (r"(?:\\angle\s*|\\overline\{)?\\?[A-Za-z]+\}?'*(?:[_^](?:\{[^{}=]{1,12}\}|\w))*"
         r"(?:\([^()=]{0,20}\))?")
_NAME_RE = re.compile(rf"\s*(?:{_NAME}|\(\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\))\s*")   # or (a, b)
_NAME_IN_RE = re.compile(rf"^\s*{_NAME}\s*\\(?:in|approx)(?![A-Za-z])\s*")   # x \in [-2, 7]
_GLOSS_RE = re.compile(r"(?<=\S)\s*\\approx(?![A-Za-z]).*", re.S)     # \sqrt{3} \approx 1.73
_EQUALS_RE = re.compile(r"(?<![<>!=])=(?!=)")


class Answer(NamedTuple):
    """One answer, normalised (normalise_answer)."""
    text: str          # the canonical string
    percent: bool      # it had a percent sign: 25% may mean 25 or 0.25
    names: list        # the left sides dropped, sorted: x = 7 -> ['x']
    components: str    # x = 3, y = -2 -> '(3,-2)': values in the order of their names, or None
    equation: bool     # a left side is an expression, not a name (2x+y = 0): it must match too
    numeric: bool      # no letters but those of \\frac, \\sqrt, \\pi, ... (_is_numeric)


def normalise_answer(s):
    """The Answer of one answer string."""
    if "\\boxed" in s or "\\fbox" in s:                  # a gold written as a completion
        s = _marked_answer(s) or s
    s = _MATRIX_RE.sub(_matrix_to_lists, s.strip())       # first: its \\ are not LaTeX spacing
    for pattern, replacement in _LATEX_RULES:
        s = pattern.sub(replacement, s)
    had_percent = "%" in s
    s = _strip_text_commands(s.replace("\\%", "").replace("%", ""))
    text, names, components = _drop_names(s.rstrip(". ").strip())
    text = _canonical(text)
    equation = any(re.search("[-+]", n) and not _NAME_RE.fullmatch(n) for n in names)
    return Answer(text, had_percent, names, components and _canonical(components), equation,
                  _is_numeric(text))


def _canonical(s):
    for pattern, replacement in _CANONICAL_RULES:
        s = pattern.sub(replacement, s)
    return s


def _strip_text_commands(s):
    """\\text{cm} after a number is a unit: drop it. \\text{(B)} alone is the answer: unwrap it."""
    for _ in range(20):                                   # bounded: at most 20 \text blocks
        m = _TEXT_COMMAND_RE.search(s)
        if m is None:
            return s
        end = _closing_brace(s, m.end() - 1)
        if end is None:                                   # unbalanced: drop the command name only
            return s[:m.start()] + s[m.end() - 1:]
        before, inner, after = s[:m.start()], s[m.end():end], s[end + 1:]
        is_unit = (re.search(r"[\d}]\s*$", before)                    # "5 \text{cm}^2"
                   and re.fullmatch(r"\s*[A-Za-z][A-Za-z ./]*", inner)
                   and re.fullmatch(r"\s*(?:\^\s*\{?\d\}?)?\s*", after))
        s = before if is_unit else before + inner + after
    return s


def _matrix_to_lists(m):
    """\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix} -> [[1,2],[3,4]] (any matrix kind)."""
    rows = [row for row in re.split(r"\\\\", m.group(2)) if row.strip()]
    return "[" + ",".join("[" + ",".join(row.split("&")) + "]" for row in rows) + "]"


def _is_numeric(s):
    """No letters but those of \\frac, \\sqrt, \\pi, \\infty, \\cdot, \\times, \\div."""
    return not re.search(r"[A-Za-z]", re.sub(r"\\(?:frac|sqrt|pi|infty|cdot|times|div)(?![A-Za-z])",
                                             "", s))


def _drop_names(s):
    """(answer, names, components): 'x = 7' -> '7', 'f(x) = 2x+3' -> '2x+3', '(a,b) = (2,7)' ->
    '(2,7)', '|AB| = 1' -> '1', a chain '1/2 = 2/4 = 0.5' -> its last side, 'x \\in [1, 2]' ->
    '[1, 2]', 'x = 1, y = 2' -> '1, 2' with components '(1,2)'. An equation ('2x + y = z',
    '7 = 11a + c') is kept whole."""
    parts, names, named = [], [], []
    for part in split_top_level(_GLOSS_RE.sub("", _NAME_IN_RE.sub("", s, count=1))):
        *left, right = _EQUALS_RE.split(part)
        if left and (all(_NAME_RE.fullmatch(x) for x in left) or _is_numeric(right)):
            part, new = right, [re.sub(r"\s+", "", x) for x in left if not _is_numeric(x)]
            if len(left) == 1 == len(new) and new[0][0] != "(":
                named.append((new[0], right))
            names += [n for x in new for n in (x[1:-1].split(",") if x[0] == "(" else [x])]
        parts.append(part)
    # components in name order (y, x -> x, y; a_{37}, a_3 -> a_3, a_{37}; r, \theta), except when
    # every name is Greek: then as written (\rho, \theta, \phi has no alphabetical convention)
    if not all(name.startswith("\\") for name, _ in named):
        named.sort(key=lambda item: item[0].lstrip("\\"))
    components = len(named) == len(parts) > 1 and f"({','.join(v for _, v in named)})"
    return ",".join(parts), sorted(names), components or None


def split_top_level(s):
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
    return parts + [s[start:]]


# -----------------------------------------------------------------------------
# Tokenisation: ids and loss mask built together from one rendering of the chat template
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def end_of_turn_ids(tokenizer):
    """Token ids that end an assistant turn: the chat end-of-turn token(s) and eos (base models
    often have eos = <|endoftext|> while their chat template ends turns with <|im_end|>)."""
    # a token absent from the vocabulary converts to None or to unk (not `in get_vocab()`: that
    # builds a dict of the whole vocabulary, ~0.1 s per call for Qwen's 151,665 tokens)
    ids = [i for i in tokenizer.convert_tokens_to_ids(list(END_OF_TURN_TOKENS))
           if i is not None and i != tokenizer.unk_token_id]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def stop_token_ids(model, tokenizer):
    """Every id that ends a completion: end_of_turn_ids and the model's
    generation_config.eos_token_id (an int or a list). Never the pad id."""
    ids = set(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if not ids:
        raise ValueError("the tokenizer and the model define no end-of-sequence token")
    return sorted(ids)


def render(tokenizer, messages, add_generation_prompt=False):
    """The text of a conversation in the tokenizer's chat template. An empty system turn means no
    system turn (--system-prompt ''): it is left out, and so is the one many templates write by
    themselves when a conversation has none (SmolLM2's "You are a helpful AI assistant named
    SmolLM, trained by Hugging Face", Qwen2.5's "You are Qwen, created by Alibaba Cloud. You are a
    helpful assistant.")."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE  # a base tokenizer without one gets ChatML
    apply = lambda m, end=add_generation_prompt: tokenizer.apply_chat_template(
        m, tokenize=False, add_generation_prompt=end)
    if not (messages and messages[0]["role"] == "system" and messages[0]["content"] == ""):
        return apply(messages)
    text = apply(messages[1:])
    # Which text is a system turn, learned from a sentinel system prompt: with it the text is
    # `before` SENTINEL `after`, and `after` begins with the end of a system turn, `close` (from a
    # sentinel turn alone). If the text without a system message is `before` + something + `after`,
    # the template wrote a system turn of its own: the rest of `after` is the text without it.
    # (Text a template writes before its system turn would go too; ChatML templates write none.)
    sentinel = {"role": "system", "content": "<SYSTEM PROMPT SENTINEL>"}
    before, _, after = apply([sentinel] + messages[1:]).partition(sentinel["content"])
    close = apply([sentinel], end=False).partition(sentinel["content"])[2]
    wrote_one = (text.startswith(before) and text.endswith(after) and after.startswith(close)
                 and len(text) >= len(before) + len(after))
    return after[len(close):] if wrote_one else text


def encode_conversation(tokenizer, messages, where="conversation"):
    """Token ids and labels of one conversation. Labels are IGNORE_INDEX except assistant turns.

    The text is rendered once and tokenised once; each assistant turn's character span (found by
    rendering the conversation up to that turn) marks which tokens are trained, so the ids are
    exactly what the model sees at inference, and no prefix is re-tokenised differently."""
    text = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = render(tokenizer, messages[: i + 1])
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once "
                            f"later turns are added, so the trained span cannot be located")
        spans.append((len(start_text), len(end_text)))
    stops = set(end_of_turn_ids(tokenizer))
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in spans:
        positions = [j for j, (s, _) in enumerate(offsets) if lo <= s < hi]
        stop_at = [j for j in positions if ids[j] in stops]
        if stop_at:  # train up to and including the end-of-turn token, not the glue after it
            positions = [j for j in positions if j <= stop_at[-1]]
        for j in positions:
            labels[j] = ids[j]
    return ids, labels


def build_sft_examples(tokenizer, conversations, max_len, num_samples=None, log=print,
                       too_long="drop"):
    """Tokenise conversations; keep the first num_samples. An example longer than max_len tokens
    is dropped (too_long="drop") or cut to its first max_len tokens, labels cut alike
    (too_long="truncate", the released EKSFT recipe's choice); a cut example with no trained
    token left is dropped."""
    if too_long not in ("drop", "truncate"):
        raise ValueError(f"too_long must be 'drop' or 'truncate', not {too_long!r}")
    examples, dropped, truncated, shortest, source = [], 0, 0, None, "the data"
    for where, messages in conversations:
        source = where.rpartition(", row ")[0] or where
        ids, labels = encode_conversation(tokenizer, messages, where)
        if len(ids) > max_len:
            # labels[t] is predicted from ids[:t], so labels[0] is never trained: look from 1
            if too_long == "drop" or all(l == IGNORE_INDEX for l in labels[1:max_len]):
                dropped += 1
                shortest = min(shortest or len(ids), len(ids))
                continue
            ids, labels, truncated = ids[:max_len], labels[:max_len], truncated + 1
        if all(l == IGNORE_INDEX for l in labels[1:]):
            raise DataError(f"{where}: no trained token after tokenisation")
        examples.append({"input_ids": ids, "labels": labels})
        if num_samples and len(examples) == num_samples:
            break
    if too_long == "drop":
        log(f"data: {len(examples)} examples, {dropped} dropped as longer than --max-len {max_len}")
    else:
        log(f"data: {len(examples)} examples, {truncated} truncated to --max-len {max_len}, "
            f"{dropped} dropped (no response token within the first {max_len})")
    if not examples:
        raise DataError(f"{source}: none of its {dropped} examples fits --max-len {max_len} "
                        f"(the shortest has {shortest} tokens)" if dropped
                        else f"{source}: no examples")
    return examples


def prompt_messages(question, system_prompt=SYSTEM_PROMPT):
    """The chat prompt used by SFT data, RL rollouts and evaluation alike. system_prompt None: no
    system message (the template may write its own); '': no system turn at all (render)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": question}]


def encode_prompt(tokenizer, question, system_prompt=SYSTEM_PROMPT):
    """Token ids of the prompt for one question, ending where the assistant's answer begins."""
    text = render(tokenizer, prompt_messages(question, system_prompt), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -----------------------------------------------------------------------------
# Batching
def pad_right(sequences, pad_value, left=False):
    """list of id lists -> (B, T) tensor padded on the right, and its attention mask; left=True
    pads on the left (prompts for generation: every prompt ends at the last column)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        columns = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, columns] = torch.tensor(s, dtype=torch.long)
        mask[i, columns] = 1
    return ids, mask


def pad_left(sequences, pad_value):
    return pad_right(sequences, pad_value, left=True)


def collate(examples, pad_id):
    """SFT examples -> dict(input_ids, attention_mask, labels), right padded."""
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad_right([e["labels"] for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def step_batches(lengths, sequences_per_step, seed, drop_last=True):
    """One epoch of optimizer steps: lists of example indices, grouped by length.

    Shuffle, cut into windows of 32 steps, sort each window by length and deal it into steps, then
    shuffle the steps: examples of a step have similar lengths (little padding) while the order
    stays random. What goes into a step depends only on the seed, never on the micro-batch size."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = sequences_per_step * 32
    steps = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: lengths[i])
        steps += [chunk[s: s + sequences_per_step]
                  for s in range(0, len(chunk), sequences_per_step)]
    if drop_last and len(order) >= sequences_per_step:
        steps = [s for s in steps if len(s) == sequences_per_step]
    rng.shuffle(steps)
    return steps


# -----------------------------------------------------------------------------
# Synthetic data: seeded multi-step arithmetic word problems (offline runs, tests, tutorial)
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hal", "Ivy", "Jon", "Kim", "Leo"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]


def synthetic_problems(n, seed=0):
    """n problems of 2-3 steps, each a dict(question, solution, answer); same seed, same rows (the
    first n of a longer list of the same seed are the same n).

    >>> p = synthetic_problems(1, seed=0)[0]
    >>> p["solution"].endswith("\\\\boxed{" + p["answer"] + "}.")
    True
    """
    return list(itertools.islice(_synthetic_stream(seed), n))


def _synthetic_stream(seed):
    """synthetic_problems' rows, one after another, without end."""
    rng = random.Random(seed)
    while True:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(2, 20)
        question = f"{name} has {total} {item}."
        steps = [f"{name} starts with {total} {item}."]
        for _ in range(rng.randint(2, 3)):
            op = rng.choice(["buy", "give", "double"] if total <= 50 else ["give"])
            if op == "buy":
                x = rng.randint(1, 15)
                question += f" Then {name} buys {x} more."
                steps.append(f"After buying {x}: {total} + {x} = {total + x}.")
                total += x
            elif op == "give" and total > 1:
                x = rng.randint(1, total - 1)
                question += f" Then {name} gives away {x}."
                steps.append(f"After giving away {x}: {total} - {x} = {total - x}.")
                total -= x
            else:
                question += f" Then {name} doubles the {item}."
                steps.append(f"After doubling: {total} * 2 = {total * 2}.")
                total *= 2
        question += f" How many {item} does {name} have now?"
        solution = " ".join(steps) + f" The answer is \\boxed{{{total}}}."
        yield {"question": question, "solution": solution, "answer": str(total)}


# The synthetic held-out set is a fixed test split, like GSM8K's: the first SYNTHETIC_HELD_OUT rows
# of seed + 10,000. Training rows come from seed + 1, minus any question of that split, since one
# generator writes both and a few questions recur (5 of the 500 of seed 0 are among the first 2,000
# training rows of seed 1; none among the first 256, so the first 256 are what they were).
SYNTHETIC_HELD_OUT = 500


def synthetic_held_out(seed=0):
    """The SYNTHETIC_HELD_OUT held-out problems of a seed (evaluate.py's: seed 0)."""
    return synthetic_problems(SYNTHETIC_HELD_OUT, seed=seed + 10_000)


def synthetic_train(n, seed=0):
    """n training problems (eksft.py's SFT pool: 2,000; rl.py's RL pool: the first 500): the rows
    of seed + 1 whose question is in neither the held-out set of this seed (rl.py's held-out
    accuracy) nor that of seed 0 (evaluate.py's, whatever seed the model was trained with)."""
    held_out = {p["question"] for s in {0, seed} for p in synthetic_held_out(s)}
    kept = (p for p in _synthetic_stream(seed + 1) if p["question"] not in held_out)
    return list(itertools.islice(kept, n))


# -----------------------------------------------------------------------------
# Reading rows: local files (with row numbers for error messages) and hub datasets
LOCAL_FORMATS = (".jsonl", ".json", ".parquet")


def source_kind(source, aliases, what="data set", hub=True):
    """What a data source names, decided before any network call: "alias" (one of `aliases`),
    "file" (anything on disk) or "hub" ("owner/name"). A name that is none of these (a mistyped
    alias such as gsm9k, a missing file) is refused now, not after a minute of hub retries."""
    if source in aliases:
        return "alias"
    ext = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory; give a {'/'.join(LOCAL_FORMATS)} file")
    other_formats = (".csv", ".tsv", ".txt", ".xlsx", ".arrow", ".gz", ".zip")  # not read here
    looks_like_a_path = ext in LOCAL_FORMATS + other_formats or source.startswith((".", os.sep))
    if os.path.exists(source) or looks_like_a_path:
        if ext not in LOCAL_FORMATS:
            raise DataError(f"{source}: unknown file type '{ext}' (use .jsonl, .json or .parquet)")
        return "file"
    if "/" not in source or not hub:
        raise UserError(f"unknown {what} '{source}': not one of the aliases {', '.join(aliases)}, "
                        f"nor a local {'/'.join(LOCAL_FORMATS)} file"
                        + (", nor a hub dataset id (owner/name)" if hub else ""))
    return "hub"


def read_local_rows(path):
    """Rows of a local .jsonl / .json / .parquet file as a list of (row_number, dict). A .json
    file holds either one JSON array of rows or JSON Lines (one object a line: what
    `datasets`' to_json writes by default); the first character that is not blank tells which.
    In JSON Lines the row number is the line number, so an error names the line to look at."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a file")
    rows, ext = [], os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        with open(path, "rb") as f:
            raw = f.read()
        if ext == ".json" and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            try:
                data = json.loads(utf8(raw, path, "", bom=True))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
            rows = list(enumerate(data, start=1))
        else:
            hint = "; a .json file holds a JSON array or one JSON object a line" * (ext == ".json")
            for number, line in enumerate(raw.split(b"\n"), start=1):
                text = utf8(line, path, f"row {number}", bom=number == 1)
                if not text.strip():
                    continue
                try:
                    rows.append((number, json.loads(text)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, row {number}: not valid JSON "
                                    f"({e.msg}{hint})") from None
    elif ext == ".parquet":
        import pyarrow.parquet  # installed with datasets
        try:
            rows = list(enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1))
        except Exception as e:  # not parquet at all, or a damaged file: pyarrow's errors vary
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    else:
        raise DataError(f"{path}: unknown file type (use .jsonl, .json or .parquet)")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {number}: expected a JSON object, "
                            f"got {type(row).__name__}")
    return rows


def utf8(raw, path, where, bom=False):
    """Bytes -> text; a binary file or a row in another encoding is a DataError naming the line."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, {where or f'line {line}'}: not UTF-8 text (byte "
                        f"{raw[e.start]:#04x}); is it a binary file?") from None


def first_line(e):
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else ""


def load_hub_rows(name, config=None, split="train"):
    """A Hugging Face Hub dataset (memory-mapped, rows read on access); offline: one clear line."""
    import datasets
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing dataset: all look different, all mean "can't"
        raise DataError(f"could not load dataset '{name}' from the Hugging Face Hub "
                        f"({type(e).__name__}: {first_line(e)}). Offline, use synthetic or a local "
                        f".jsonl file.") from None


# -----------------------------------------------------------------------------
# Command lines: what the four scripts share, so that every bad input ends as one `error:` line
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one `error: ...` line like every other bad input,
    not the usage text (dozens of lines here) followed by the message."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends "(default: X)", except where the default is None or False: there the help
    text says what happens (a default that depends on the model), so it is printed once."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def require(parser, args, rules):
    """parser.error for the first (name, ok, what) rule that fails: "--name VALUE: must be WHAT"."""
    for name, ok, what in rules:
        if not ok:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {what}")


def run_cli(main):
    """Run a script's entry point: a UserError becomes one `error: ...` line on stderr and exit
    code 2 (argparse's code for bad arguments); Ctrl-C ends with its message and code 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# A look at the data from the command line (eksft.py --show-mask shows the trained tokens)
def main(argv=None):
    parser = ArgumentParser(description="Print rows of an SFT data source as chat turns.",
                            formatter_class=HelpFormatter)
    parser.add_argument("--data", default="synthetic", help="alias, hub dataset or local file")
    parser.add_argument("--num-samples", type=int, default=3, help="rows to print")
    parser.add_argument("--seed", type=int, default=0, help="seed for synthetic data and shuffling")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples}: must be at least 1")
    conversations = load_conversations(args.data, seed=args.seed)
    for where, messages in itertools.islice(conversations, args.num_samples):
        print(f"--- {where}\n" + json.dumps(messages, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
