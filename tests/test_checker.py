"""The answer checker of rl.py against hand-written tables and hostile inputs.

Every expected value below was written by hand from the rules in the issue, not copied from the
checker's output. Run: python -m pytest tests/test_checker.py -q
"""
import builtins
import os
import subprocess
import time

import pytest

from rl import extract_answer, grpo_reward_fn, is_equiv, math_reward

# ----------------------------------------------------------------------------
# extract_answer: (completion text, expected answer or None)

EXTRACT_CASES = [
    ("so the result is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                        # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}} is it", "\\frac{\\sqrt{3}}{2}"),   # two levels of nesting
    ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),            # last boxed wins
    ("\\boxed 5", "5"),                                               # boxed without braces
    ("$\\boxed 12$", "12"),
    ("\\fbox{7}", "7"),
    ("\\boxed {8}", "8"),                                             # space before the brace
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                            # escaped braces inside
    ("\\boxed{}", None),                                              # empty answer counts as none
    ("\\boxed{2} and then \\boxed{3", "2"),                           # unclosed last box is ignored
    ("\\boxed{", None),
    ("\\boxed{" + "1" * 20_000 + "}", None),                  # over 10,000 characters is not an answer
    ("The answer is 17.", "17"),
    ("Thus, the final answer is: **42**.", "42"),
    ("The answer is $\\frac{3}{4}$. Done.", "\\frac{3}{4}"),
    ("the answer is 3.5", "3.5"),                                     # a decimal point is not a sentence end
    ("The answer is (B).", "(B)"),
    ("Natalia sold 48 clips.\n#### 72", "72"),                        # GSM8K style
    ("#### 1,234", "1,234"),
    ("The answer is 5. \\boxed{6}", "6"),                             # boxed beats "the answer is"
    ("The answer is 5.\n#### 6", "5"),                                # "the answer is" beats ####
    ("I am not sure.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------
# is_equiv: (prediction, gold, expected)

EQUIV_CASES = [
    # identical and trivially different
    ("42", "42", True),
    ("42", "43", False),
    (" 42 ", "42", True),
    ("-5", "-5", True),
    ("-5", "5", False),
    ("- 5", "-5", True),
    ("−5", "-5", True),                           # unicode minus
    # fractions and decimals
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac12", "0.5", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\frac{1}{3}", "0.3333", True),             # within relative 1e-4
    ("\\frac{1}{3}", "0.33", False),              # not within relative 1e-4
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-0.75", True),
    ("3.0", "3", True),                           # trailing zeros
    ("2.50", "2.5", True),
    (".5", "0.5", True),
    ("1.0001", "1", True),                        # relative difference exactly 1e-4
    ("1.001", "1", False),
    # percent
    ("25\\%", "0.25", True),
    ("25\\%", "25", True),
    ("25%", "0.25", True),
    ("25\\%", "0.5", False),
    # thousands separators, only where they form real groups
    ("1,234,567", "1234567", True),
    ("1,234", "1234", True),
    ("12,345.5", "12345.5", True),
    ("1,23", "123", False),                       # not a thousands group: a list
    ("1, 234", "1234", False),                    # a space makes it a list
    # units, currency, degrees
    ("5 \\text{ cm}", "5", True),
    ("5\\text{cm}^2", "5", True),
    ("\\$18.00", "18", True),
    ("18 dollars", "18", True),
    ("\\$1,000", "1000", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("90°", "90", True),
    ("45^\\circ", "90", False),
    # "x =" prefixes
    ("x = 7", "7", True),
    ("x=7", "x = 7", True),
    ("\\theta = 30^\\circ", "30", True),
    ("x = 8", "7", False),
    # powers and products, evaluated without eval()
    ("2^{10}", "1024", True),
    ("2^10", "1024", True),
    ("3\\cdot 4", "12", True),
    ("3 \\times 4", "12", True),
    ("2^{-1}", "0.5", True),
    ("(-2)^3", "-8", True),
    ("-2^2", "-4", True),                         # unary minus binds looser than ^
    ("1.5 \\times 10^{3}", "1500", True),
    ("2\\pi", "6.28319", True),                   # implicit product with \pi
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("\\left( \\frac{1}{2} \\right)", "0.5", True),
    # tuples, intervals, sets, lists
    ("(1, 2)", "(1,2)", True),
    ("\\left( 1, \\frac{1}{2} \\right)", "(1, 0.5)", True),
    ("(1, 2)", "(2, 1)", False),                  # tuples are ordered
    ("(1, 2)", "[1, 2]", False),                  # an open interval is not a closed one
    ("[0, 1)", "[0,1)", True),
    ("(0, 1]", "(0, 1)", False),
    ("[-1, \\infty)", "[-1,\\infty)", True),
    ("\\{1, 2\\}", "\\{1,2\\}", True),
    ("(1, 2, 3)", "(1, 2)", False),
    ("1, 2", "2, 1", True),                       # an unbracketed list of solutions is unordered
    ("1, 2", "1, 3", False),
    # multiple choice and text
    ("(B)", "B", True),
    ("B)", "B", True),
    ("\\text{(B)}", "B", True),
    ("\\textbf{B}", "B", True),
    ("(C)", "B", False),
    ("\\text{Monday}", "Monday", True),
    # expressions that are not numbers: normalised string equality
    ("y = 2x + 3", "2x+3", True),
    ("\\sqrt{x}", "\\sqrt{x}", True),
    ("x^2", "x^3", False),
    ("x^{2} + 1", "x^2+1", True),
    ("a_{1}", "a_1", True),
    # empty and missing answers never match
    ("", "5", False),
    ("5", "", False),
    (None, "5", False),
    ("   ", "   ", False),
    # arithmetic that is not defined is compared as a string, never evaluated
    ("1/0", "1", False),
    ("1/0", "\\infty", False),
]


@pytest.mark.parametrize("pred,gold,expected", EQUIV_CASES)
def test_is_equiv(pred, gold, expected):
    assert is_equiv(pred, gold) is expected


def test_table_sizes():
    assert len(EXTRACT_CASES) + len(EQUIV_CASES) >= 60


# ----------------------------------------------------------------------------
# math_reward and the TRL reward function

def test_math_reward():
    assert math_reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("so \\boxed{3}", "0.5") == 0.0
    assert math_reward("no answer at all", "0.5") == 0.0
    assert math_reward("Natalia sold 72 clips.\n#### 72", "72") == 1.0
    # the small format reward is off by default, and never more than a correct answer
    assert math_reward("so \\boxed{3}", "4", format_reward=0.1) == pytest.approx(0.1)
    assert math_reward("so 3", "4", format_reward=0.1) == 0.0
    assert math_reward("so \\boxed{4}", "4", format_reward=0.1) == 1.0


def test_grpo_reward_fn_accepts_strings_and_messages():
    completions = ["\\boxed{4}", "\\boxed{5}"]
    assert grpo_reward_fn(completions, answer=["4", "4"], prompts=["p", "p"]) == [1.0, 0.0]
    chat = [[{"role": "assistant", "content": "\\boxed{4}"}], [{"role": "assistant", "content": "x"}]]
    assert grpo_reward_fn(chat, answer=["4", "4"]) == [1.0, 0.0]


def test_unknown_checker_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown checker"):
        is_equiv("1", "1", checker="sympy")


def test_math_verify_backend_or_clear_message():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install"):
            is_equiv("0.5", "\\frac{1}{2}", checker="math-verify")
    else:
        assert is_equiv("0.5", "\\frac{1}{2}", checker="math-verify")
        assert not is_equiv("0.6", "\\frac{1}{2}", checker="math-verify")


# ----------------------------------------------------------------------------
# hostile inputs: never raise, never hang, never execute anything

MEGA = 1_000_000
PATHOLOGICAL = [
    "{" * MEGA,                                         # unbalanced braces
    "}" * MEGA,
    "\\boxed{" * 300_000,                               # many unclosed boxes
    "\\boxed" + " " * MEGA,                            # a box followed by a megabyte of spaces
    "\\boxed{" + "{" * MEGA + " \\boxed{1}",
    "\\boxedx{" * 200_000,                             # not a box at all, many times
    "####\n" * 200_000,
    "The answer is 1. " * 60_000,
    "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",   # deeply nested but balanced
    "(" * 100_000 + "1" + ")" * 100_000,
    "{" * 100_000 + "1" + "}" * 100_000,
    "1" * MEGA,                                         # a megabyte number
    "the answer is " + " " * MEGA,
    "#### " + "9" * MEGA,
    "x" * MEGA,
    "1e99999",
    "-1e99999",
    "9^{9^{9^9}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "10^{10^{10}}",
    "10^{308} \\cdot 10^{308}",
    "1/0",
    "\\frac{1}{0}",
    "0^{-1}",
    "(-8)^{1/3}",                                       # complex in Python: must not leak out
    "\\sqrt{-1}",
    "\\frac{" * 10_000,
    "\\text{" * 10_000 + "5",
    "2" + "^2" * 10_000,
    "\\boxed{" + "1+" * 200_000 + "1}",
    "(1," * 50_000,
    "__import__('os').system('echo pwned')",
]


@pytest.mark.parametrize("i", range(len(PATHOLOGICAL)))
def test_pathological_inputs_return_fast(i):
    text = PATHOLOGICAL[i]
    start = time.perf_counter()
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    for pred in (text, f"\\boxed{{{text}}}", answer):
        for gold in ("1", text):
            assert isinstance(is_equiv(pred, gold), bool)
    assert math_reward(text, "1") in (0.0, 1.0)
    assert math_reward(f"\\boxed{{{text}}}", text[:100]) in (0.0, 1.0)
    assert time.perf_counter() - start < 1.0


def test_nothing_is_executed(monkeypatch, tmp_path):
    """With eval/exec/compile and process spawning booby-trapped, the whole table and the hostile
    inputs still run, and a payload that would create a file creates nothing."""
    def trap(*args, **kwargs):
        raise AssertionError(f"the checker tried to execute something: {args!r:.80}")
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, trap)
    monkeypatch.setattr(os, "system", trap)
    monkeypatch.setattr(subprocess, "Popen", trap)

    marker = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {marker}')",
                f"\\boxed{{__import__('os').system('touch {marker}')}}",
                f"The answer is open('{marker}', 'w').write('x')",
                "().__class__.__bases__[0].__subclasses__()"]
    for text in payloads + PATHOLOGICAL[10:] + [p for p, _, _ in EQUIV_CASES if p]:
        extract_answer(text)
        is_equiv(text, "1")
        is_equiv("1", text)
        math_reward(text, text)
    assert not marker.exists()
