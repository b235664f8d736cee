"""
data.py: the data side of eksft. Reads SFT rows as chat conversations, turns a conversation into
token ids plus a loss mask, loads question/answer sets and groups examples into batches. (Reading
the final answer a completion states is the answer checker's job, at the end of rl.py.)

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


class ModelDefaults:
    """The flags whose default depends on the kind of model ("tiny", "smol", "hub"): add is the
    parser's add_argument that appends every kind's default to the flag's help, and after
    parsing, fill gives each of those flags left out (None) the default of the model's kind."""

    def __init__(self, parser, by_kind):
        self.parser, self.by_kind = parser, by_kind      # by_kind: kind -> {dest: default}

    def add(self, *flags, **kwargs):
        action = self.parser.add_argument(*flags, **kwargs)
        per_kind = [f"{kind}: {defaults[action.dest]}" for kind, defaults
                    in sorted(self.by_kind.items()) if action.dest in defaults]
        if per_kind:   # --help: "peak learning rate (hub: 1e-05; smol: 1e-05; tiny: 0.003)"
            action.help += f" ({'; '.join(per_kind)})"
        return action

    def fill(self, args, kind):
        for dest, default in self.by_kind[kind].items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)


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
