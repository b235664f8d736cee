"""data.py: formats, the label mask, bad-input messages, batching, synthetic problems."""
import doctest
import json
import re

import pytest

import data
from data import IGNORE_INDEX, DataError
from eksft import char_tokenizer

TOKENIZER = char_tokenizer()
SYS = {"role": "system", "content": data.SYSTEM_PROMPT}


def trained_text(ids, labels):
    """Decode the trained runs of an example, each run on its own line."""
    runs, current = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i, "a label must equal the token it sits on (unshifted labels)"
            current.append(i)
        elif current:
            runs.append(TOKENIZER.decode(current))
            current = []
    if current:
        runs.append(TOKENIZER.decode(current))
    return runs


def test_labels_cover_exactly_the_assistant_turns_and_their_end_token():
    messages = [SYS, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ids, labels = data.encode_conversation(TOKENIZER, messages)
    assert trained_text(ids, labels) == ["2<|im_end|>", "It is 4.<|im_end|>"]
    # and the ids are exactly the chat template's rendering, tokenised once
    assert TOKENIZER.decode(ids) == TOKENIZER.apply_chat_template(messages, tokenize=False)


def test_a_tokenizer_without_chat_template_gets_chatml():
    tok = char_tokenizer()
    tok.chat_template = None
    ids, labels = data.encode_conversation(tok, [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}])
    assert tok.decode(ids) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert [tok.decode([i]) for i, l in zip(ids, labels) if l != IGNORE_INDEX] == ["a", "<|im_end|>"]


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    {"conversations": [{"role": "user", "value": "Q"}, {"role": "assistant", "value": "A"}]},
    {"problem": "Q", "solution": "A"},
    {"question": "Q", "answer": "A"},
])
def test_every_row_format_gives_the_same_conversation(row):
    expected = [SYS, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert data.row_to_messages(row, "f, row 1") == expected


def test_an_existing_system_turn_is_kept():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    assert data.row_to_messages(row, "f")[0] == {"role": "system", "content": "S"}


BAD_ROWS = [  # (file content, message fragment); the bad row is always the second line
    ('{"question": "q", "answer": "a"}\n{"question": "q"\n', "row 2: not valid JSON"),
    ('{"question": "q", "answer": "a"}\n{"text": "no known fields"}\n', "row 2: expected 'messages'"),
    ('{"question": "q", "answer": "a"}\n{"problem": "q", "solution": "  "}\n', "row 2: turn 2 is an empty assistant turn"),
    ('{"question": "q", "answer": "a"}\n{"question": "q", "answer": 7}\n', "row 2: turn 2 (assistant) content is int"),
    ('{"question": "q", "answer": "a"}\n{"messages": [{"role": "robot", "content": "x"}]}\n', "row 2: turn 1 has unknown role 'robot'"),
    ('{"question": "q", "answer": "a"}\n{"messages": [{"role": "user", "content": "x"}]}\n', "row 2: no assistant turn"),
    ('{"question": "q", "answer": "a"}\n[1, 2]\n', "row 2: expected a JSON object"),
    ('{"question": "q", "answer": "a"}\n{"messages": []}\n', "row 2: 'messages' must be a non-empty list"),
]


@pytest.mark.parametrize("content,fragment", BAD_ROWS)
def test_bad_rows_name_the_file_the_row_and_the_problem(tmp_path, content, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        data.load_conversations(str(path))
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    (tmp_path / "y.json").write_text('[{"question": "q", "answer": "a"},')
    (tmp_path / "z.txt").write_text("hello")
    for name, fragment in [("x.json", "expected a JSON list"), ("y.json", "not valid JSON"),
                           ("missing.jsonl", "no such file")]:
        with pytest.raises(DataError, match=re.escape(fragment)):
            data.load_conversations(str(tmp_path / name))
    with pytest.raises(DataError, match="unknown file type"):
        data.read_local_rows(str(tmp_path / "z.txt"))


def test_json_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q"}]))
    with pytest.raises(DataError, match=r"d\.json, row 2"):
        data.load_conversations(str(path))


def test_qa_rows_need_question_and_answer(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": 3}\n\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl, row 3: missing field 'answer'"):
        data.load_qa(str(path))
    path.write_text('{"question": "q", "answer": 3}\n')
    assert data.load_qa(str(path)) == [{"question": "q", "answer": "3"}]
    with pytest.raises(data.UserError, match="unknown question/answer set"):
        data.load_qa("no-such-benchmark")


def test_too_long_examples_are_dropped_and_counted():
    convs = [(f"r{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * n}])
             for i, n in enumerate([5, 500, 10])]
    lines = []
    examples = data.build_sft_examples(TOKENIZER, convs, max_len=100, log=lines.append)
    assert [e["input_ids"].count(TOKENIZER.convert_tokens_to_ids("x")) for e in examples] == [5, 10]
    assert "1 dropped" in lines[0]


def solve_by_reading(question):
    """An independent solver for the synthetic problems: re-reads the story sentence by sentence."""
    total = int(re.search(r"has (\d+)", question).group(1))
    for sentence in question.split(". "):
        if m := re.search(r"buys (\d+) more", sentence):
            total += int(m.group(1))
        elif m := re.search(r"gives away (\d+)", sentence):
            total -= int(m.group(1))
        elif "doubles" in sentence:
            total *= 2
    return total


def test_synthetic_problems_are_seeded_and_correct():
    rows = data.synthetic_problems(200, seed=3)
    assert rows == data.synthetic_problems(200, seed=3)
    assert rows != data.synthetic_problems(200, seed=4)
    for r in rows:
        assert int(r["answer"]) == solve_by_reading(r["question"]) >= 0
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
    # the held-out and training question sets do not share a generator seed
    held_out = {r["question"] for r in data.load_qa("synthetic", limit=200)}
    train = {r["question"] for r in data.load_qa("synthetic-train", limit=200)}
    assert len(held_out & train) < 10


def test_step_batches_cover_each_example_once_and_group_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(256)]
    steps = data.step_batches(lengths, 16, seed=0)
    assert steps == data.step_batches(lengths, 16, seed=0)
    assert sorted(i for s in steps for i in s) == list(range(256))
    padded = sum(len(s) * max(lengths[i] for i in s) for s in steps)
    import random
    order = list(range(256))
    random.Random(0).shuffle(order)
    padded_random = sum(16 * max(lengths[i] for i in order[s:s + 16]) for s in range(0, 256, 16))
    assert padded < 0.8 * padded_random  # grouping by length cuts padding


def test_padding():
    ids, mask = data.pad_left([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = data.collate([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert batch["labels"].tolist() == [[-100, 6], [7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_gsm8k_solution_format():
    assert data.gsm8k_solution("He has 2+3=<<2+3=5>>5 apples.\n#### 5") == \
        "He has 2+3=5 apples.\nThe answer is \\boxed{5}."


def test_doctests_run():
    import eksft
    for module in (data, eksft):
        assert doctest.testmod(module).failed == 0


def fake_hub(tables):
    """Stand-in for data.load_hub_rows: the Hub is unreachable here, the row handling is not."""
    def load(name, config=None, split="train"):
        return tables[(name, config, split)]
    return load


def test_openr1_takes_the_first_verified_complete_generation(monkeypatch):
    rows = [
        {"problem": "p1", "generations": ["wrong", "right1"], "correctness_math_verify": [False, True],
         "is_reasoning_complete": [True, True]},
        {"problem": "p2", "generations": ["cut off", "x"], "correctness_math_verify": [True, False],
         "is_reasoning_complete": [False, True]},  # no generation is both verified and complete
        {"problem": "p3", "generations": ["right3" + "y" * 400], "correctness_math_verify": [True],
         "is_reasoning_complete": [True]},
        {"problem": "p4", "generations": ["right4"], "correctness_math_verify": [True],
         "is_reasoning_complete": [True]},
    ]
    monkeypatch.setattr(data, "load_hub_rows",
                        fake_hub({("open-r1/OpenR1-Math-220k", "default", "train"): rows}))
    convs = list(data.load_conversations("openr1-3k", seed=0))
    assert sorted(m[-1]["content"][:6] for _, m in convs) == ["right1", "right3", "right4"]
    assert all(m[0] == SYS and m[1]["role"] == "user" for _, m in convs)
    # the seeded order is a permutation, the same for the same seed
    assert [w for w, _ in convs] == [w for w, _ in data.load_conversations("openr1-3k", seed=0)]
    # too long for --max-len: p3 is skipped, and num_samples counts only examples that fit
    examples = data.build_sft_examples(TOKENIZER, data.load_conversations("openr1-3k", seed=0),
                                       max_len=200, num_samples=2, log=lambda *_: None)
    assert len(examples) == 2


def test_gsm8k_answers_come_from_after_the_hashes(monkeypatch):
    rows = [{"question": "q", "answer": "2*3=<<2*3=6>>6\n#### 1,200"}]
    monkeypatch.setattr(data, "load_hub_rows", fake_hub({("openai/gsm8k", "main", "test"): rows,
                                                        ("openai/gsm8k", "main", "train"): rows}))
    assert data.load_qa("gsm8k") == [{"question": "q", "answer": "1,200"}]
    [(where, messages)] = list(data.load_conversations("gsm8k"))
    assert where == "gsm8k, row 1"
    assert messages[-1]["content"] == "2*3=6\nThe answer is \\boxed{1,200}."


def test_hub_failure_is_one_clear_line():
    with pytest.raises(DataError, match="could not load dataset 'no-such/dataset'.*Offline, use "
                                        "synthetic or a local .jsonl file"):
        list(data.load_conversations("no-such/dataset"))
