"""The answer checker of rl.py against hand-written tables and hostile inputs.

Every expected value below was written by hand, from how models write answers and what a grader
should say about them, not copied from the checker's output. Run: python -m pytest tests/test_checker.py -q
"""
import builtins
import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest

import rl
from rl import checker_description, default_checker, extract_answer, grpo_reward_fn, is_equiv, math_reward

try:
    import math_verify  # noqa: F401
    HAVE_MATH_VERIFY = True
except ImportError:
    HAVE_MATH_VERIFY = False
needs_math_verify = pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="math-verify is not installed")

# ----------------------------------------------------------------------------
# extract_answer: (completion text, expected answer or None)

EXTRACT_CASES = [
    # an answer phrase followed by a sentence in words: its last formula or number
    ("Final Answer: The area of $\\triangle PQR$ is 56. I hope it is correct.", "56"),
    ("Final Answer: the smallest such $k$ is $\\frac{3}{2}$.", "\\frac{3}{2}"),
    ("The answer is 18 dollars per week.", "18"),
    ("The answer is 5 apples.", "5 apples"),                          # one word: a unit, kept
    ("The answer is $x = 5$ and we are done", "x = 5"),
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
    # several boxes that form one answer
    ("the roots are $\\boxed{-2}$ and $\\boxed{1}$.", "-2, 1"),
    ("\\[ \\boxed{3} \\quad \\text{and} \\quad \\boxed{5} \\]", "3, 5"),
    ("$x = \\boxed{2}, \\boxed{7}$", "2, 7"),
    ("\\boxed{a}\\boxed{b}", "a, b"),
    ("we get \\boxed{4} if x > 0, otherwise \\boxed{5}", "5"),          # words between: only the last
    ("\\boxed{\\boxed{6}}", "6"),                                      # nested boxes are not joined
    # answer phrases
    ("The answer is 17.", "17"),
    ("Thus, the final answer is: **42**.", "42"),
    ("The answer is $\\frac{3}{4}$. Done.", "\\frac{3}{4}"),
    ("the answer is 3.5", "3.5"),                                     # a decimal point is not a sentence end
    ("The answer is (B).", "(B)"),
    ("The answer is 5. \\boxed{6}", "6"),                             # a later box beats the phrase
    ("so $\\boxed{12}$ is the area of one face.\nThe final answer is $72$.", "72"),   # later phrase wins
    ("The final answer is $\\boxed{9}$. I hope it is correct.", "9"),
    ("\\boxed{5}. We check that the answer is correct.", "5"),       # a later remark is no answer
    ("\\boxed{4}. Let me verify the answer: plug in x = 4.", "4"),
    ("\\boxed{4}, and the answer is $\\frac{8}{2}$", "\\frac{8}{2}"),   # but a later formula is
    ("Final answer: -3.5", "-3.5"),
    ("In all, the answer is **$1,250**.", "1,250"),
    ("**Final Answer:** 12 apples", "12 apples"),
    ("**Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("Answer: 7\nWait, no.", "7"),
    ("Answer \\[ 2x+1 \\]", "2x+1"),
    ("To answer this, we count: 3 + 4 = 7.", None),                 # "answer" alone is no phrase
    ("<answer>15</answer>", "15"),
    ("<answer>so \\boxed{15}</answer> and later 16", "15"),
    ("<think>maybe \\boxed{3}</think>It is \\boxed{4}.", "4"),        # only the text after </think>
    ("<think>the answer is \\boxed{3}</think> no answer here", None),
    ("Natalia sold 48 clips.\n#### 72", "72"),                        # GSM8K style
    ("#### 1,234", "1,234"),
    ("The answer is 5.\n#### 6", "5"),                                # a phrase beats ####
    ("I am not sure.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


LAST_NUMBER_CASES = [   # the Qwen2.5-Math harness's fallback, on only when asked for
    ("She has 3 apples and buys 4, so 7 in all.", "7"),
    ("The total is 1,234.5 dollars", "1234.5"),                       # commas dropped first
    ("it drops to -3 degrees", "-3"),
    ("\\boxed{5} and then 6", "5"),                                   # a box still comes first
    ("the answer is 8, not 9", "8, not 9"),                           # and so does a phrase
    ("no digits at all", None),
]


@pytest.mark.parametrize("text,expected", LAST_NUMBER_CASES)
def test_extract_answer_last_number(text, expected):
    assert extract_answer(text, last_number=True) == expected
    if "\\boxed" not in text and "answer" not in text:
        assert extract_answer(text) is None                           # off by default (RL)


# ----------------------------------------------------------------------------
# normalise_answer: one row per rule of its tables, worked by hand from the rule's comment

NORMALISED = [
    # answer,          text,            percent, names,     components, equation, numeric
    ("x = 7",          "7",             False, ["x"],       None,       False, True),   # a name
    ("y = 2x + 3",     "2x+3",          False, ["y"],       None,       False, False),
    ("2x + y = 0",     "0",             False, ["2x+y"],    None,       True,  True),   # equation
    ("x = 3, y = -2",  "3,-2",          False, ["x", "y"],  "(3,-2)",   False, True),   # a point
    ("25\\%",          "25",            True,  [],          None,       False, True),
    ("\\dfrac12",      "\\frac{1}{2}",  False, [],          None,       False, True),
    ("1,234",          "1234",          False, [],          None,       False, True),
    ("0.50",           "0.5",           False, [],          None,       False, True),
    ("10 \\text{cm}",  "10",            False, [],          None,       False, True),   # a unit
    ("\\text{(B)}",    "B",             False, [],          None,       False, False),  # a choice
    ("twenty-one",     "21",            False, [],          None,       False, True),
]


@pytest.mark.parametrize("answer, text, percent, names, components, equation, numeric", NORMALISED)
def test_normalise_answer(answer, text, percent, names, components, equation, numeric):
    assert rl.normalise_answer(answer) == rl.Answer(text, percent, names, components, equation,
                                                    numeric)


# ----------------------------------------------------------------------------
# is_equiv with the builtin rules: (prediction, gold, expected)

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
    ("\\cfrac{1}{3}", "1/3", True),
    ("\\tfrac12", "0.5", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-0.75", True),
    ("3.0", "3", True),                           # trailing zeros
    ("2.50", "2.5", True),
    (".5", "0.5", True),
    # exactness: integers exactly, a decimal to the precision it is written with
    ("70001", "70000", False),
    ("18.0009", "18", False),
    ("1.0001", "1", False),
    ("18.00", "18", True),
    ("1000000000001", "10^{12}", False),
    ("0.3333", "\\frac{1}{3}", True),             # a rounding of 1/3 to 4 places
    ("0.333", "\\frac{1}{3}", True),
    ("0.33", "\\frac{1}{3}", False),              # two significant digits say too little
    ("0.334", "\\frac{1}{3}", False),             # not the rounding of 1/3
    ("3.14", "\\pi", False),                   # a decimal is never an irrational
    ("3.1", "\\pi", False),
    ("6.28", "2\\pi", False),
    ("12.5", "12.54", False),                     # two written decimals compare exactly
    ("1.41", "\\sqrt{2}", False),
    ("1.42", "\\sqrt{2}", False),
    # percent
    ("25\\%", "0.25", True),
    ("25\\%", "25", True),
    ("25%", "0.25", True),
    ("25\\%", "0.5", False),
    ("33.3\\%", "\\frac{1}{3}", True),
    # thousands separators, plain and LaTeX, only where they form real groups
    ("1,234,567", "1234567", True),
    ("1,234", "1234", True),
    ("12,345.5", "12345.5", True),
    ("14{,}916", "14916", True),
    ("2,\\!500", "2500", True),
    ("1\\,234", "1234", True),
    ("1{,}000{,}000", "10^6", True),
    ("\\$16,\\!386.20", "16386.2", True),
    ("12{,}345", "12346", False),
    ("1,23", "123", False),                       # not a thousands group: a list
    ("1, 234", "1234", False),                    # a space makes it a list
    # mixed numbers
    ("7\\frac{1}{2}", "7.5", True),
    ("7\\frac12", "\\frac{15}{2}", True),
    ("-2\\frac{1}{4}", "-2.25", True),
    ("3 1/2", "3.5", True),
    ("\\frac{1}{2}", "5\\frac{1}{2}", False),
    ("5\\frac{1}{2}", "2.5", False),              # a mixed number, not 5 times 1/2
    ("2\\frac{\\sqrt{3}}{2}", "\\sqrt{3}", True),  # a root is a product, never a mixed number
    # units, currency, degrees
    ("5 \\text{ cm}", "5", True),
    ("5\\text{cm}^2", "5", True),
    ("\\frac{3}{2}\\text{ meters}", "1.5", True),
    ("125\\textnormal{ miles}", "125", True),
    ("10cm^2", "10", True),
    ("10 weeks", "10", True),
    ("10hours", "10", True),
    ("6xy", "6", False),                          # a variable glued to a number is not a unit
    ("\\$18.00", "18", True),
    ("18 dollars", "18", True),
    ("\\$1,000", "1000", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("90°", "90", True),
    ("45^\\circ", "90", False),
    # names, prefixes and glosses
    ("x = 7", "7", True),
    ("x=7", "x = 7", True),
    ("\\theta = 30^\\circ", "30", True),
    ("x = 8", "7", False),
    ("y = 7", "x = 7", False),                    # both name something: the names must agree
    ("x \\in [-2,7]", "[-2, 7]", True),
    ("x \\in (-\\infty, 3)", "(-\\infty, 3]", False),
    ("(a,b) = (2,7)", "(2, 7)", True),
    ("(a,b) = (2,7)", "(7, 2)", False),
    ("f(x) = 2x+3", "2x + 3", True),
    ("x = 1, y = 2", "1, 2", True),
    ("p = 3 \\text{ and } q = 5", "3, 5", True),
    ("|AB| = 5", "5", True),                      # a named quantity
    ("2x + 4y = 3", "3", False),                  # an equation is not its right side
    ("x + y = 3", "2x + y = 3", False),
    ("7 = 11a + c", "11a+c", False),
    ("3 + 4 = 7", "7", True),                     # a computation: its last side
    ("\\frac{1}{2} = \\frac{2}{4} = 0.5", "\\frac{1}{2}", True),
    ("\\frac{\\sqrt{3}}{3} \\approx 0.577", "\\frac{\\sqrt{3}}{3}", True),   # a decimal gloss
    ("x \\approx 11", "11", True),
    ("2 \\approx 2.1", "2.1", False),
    ("+\\infty", "\\infty", True),
    ("[1, +\\infty)", "[1, \\infty)", True),
    ("6 \\text{ and } 8", "6, 8", True),
    ("6 and 8", "8, 6", True),
    ("7, -2, \\text{and } -5", "-5, -2, 7", True),
    ("185\\", "185", True),                       # a stray trailing backslash
    ("\\\\frac{1}{2}", "0.5", True),                # \\frac: a backslash escaped twice (JSON)
    # inequalities in one variable are intervals
    ("-2 \\le x \\le 7", "[-2, 7]", True),
    ("-2 \\leq x < 7", "[-2, 7)", True),
    ("x > 5", "(5, \\infty)", True),
    ("x \\geq 5", "x >= 5", True),
    ("x \\le 5", "(-\\infty, 5]", True),
    ("x < 5", "(-\\infty, 5]", False),
    # powers and products, evaluated without eval()
    ("2^{10}", "1024", True),
    ("2^10", "1024", True),
    ("3\\cdot 4", "12", True),
    ("3 \\times 4", "12", True),
    ("2^{-1}", "0.5", True),
    ("(-2)^3", "-8", True),
    ("-2^2", "-4", True),                         # unary minus binds looser than ^
    ("1.5 \\times 10^{3}", "1500", True),
    ("2^6 3^2", "576", True),                     # a product written with a space
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
    ("\\{3, 1, 2\\}", "\\{1, 2, 3\\}", True),     # sets are unordered
    ("\\{1, 2\\}", "1, 2", True),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
    ("(1, 2, 3)", "(1, 2)", False),
    ("1, 2", "2, 1", True),                       # an unbracketed list of solutions is unordered
    ("1, 2", "1, 3", False),
    ("1, 1, 2", "1, 2, 2", True),                 # ... a set: a repeated solution is one solution
    ("(1, 2), (3, 4), (1, 2)", "(3,4), (1,2)", True),
    ("1, 1, 2", "1, 2, 3", False),
    ("1, 1", "1, 2", False),
    ("\\pm 3", "3, -3", True),
    ("1 \\pm \\sqrt{2}", "1-\\sqrt{2}, 1+\\sqrt{2}", True),
    ("3", "\\pm 3", False),
    ("(2, 1), (1, 2)", "(1,2),(2,1)", True),
    # matrices and vectors: any spacing, element by element
    ("\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{bmatrix}1&0\\\\0&1\\end{bmatrix}", True),
    ("\\begin{pmatrix} \\frac{1}{2} \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ 3 \\\\ \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),   # shape
    ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    # multiple choice and text
    ("(B)", "B", True),
    ("B)", "B", True),
    ("\\text{(B)}", "B", True),
    ("\\textbf{B}", "B", True),
    ("(C)", "B", False),
    ("\\text{Monday}", "Monday", True),
    ("\\textnormal{Monday}", "Monday", True),
    # expressions that are not numbers: normalised string equality
    ("y = 2x + 3", "2x+3", True),
    ("\\sqrt{x}", "\\sqrt{x}", True),
    ("x^2", "x^3", False),
    ("x^{2} + 1", "x^2+1", True),
    ("2*x + 1", "2x+1", True),
    ("a_{1}", "a_1", True),
    ("5 \\geq x", "x \\leq 5", True),                              # an inequality read from either side
    ("5 < x", "x > 5", True),
    ("5 < x", "x < 5", False),
    # expressions in one-letter variables: the same function (both evaluated at two sample points)
    ("(x+1)^2", "x^2+2x+1", True),
    ("(x+1)^2", "x^2+1", False),
    ("(a-b)(a+b)", "a^2-b^2", True),
    ("(a-b)(a+b)", "a^2-b^2+10^{-6}", False),                  # a near miss is a miss
    ("x + 70001", "70000 + x", False),
    ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True),
    ("4/3-7t/6", "\\frac{8-7t}{6}", True),
    ("\\frac{1}{\\cos x}", "\\sec x", True),
    ("\\sin^2 x + \\cos^2 x", "1", False),                    # no variable on one side: a string
    ("\\tan^2(y)+1", "\\sec^2(y)", True),
    ("[t, 1 + t]", "[t, t + 1]", True),
    ("2x", "2y", False),                                       # other variables
    ("no", "on", False),                                       # words are not products
    ("cats", "acts", False),
    # answers given as completions (a gold with boxes)
    ("1, 2", "\\boxed{1}\\boxed{2}", True),
    ("-2, 1", "\\(\\boxed{1}\\) and \\(\\boxed{-2}\\).", True),
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
    assert is_equiv(pred, gold, checker="builtin") is expected


def test_table_sizes():
    assert len(EXTRACT_CASES) + len(EQUIV_CASES) >= 200


# ----------------------------------------------------------------------------
# Classes of answers a held-out check got wrong, one table each (checker modes as stated)

INTEGER_CASES = [   # integers of any length, exactly
    ("100000000000001", "100000000000000", False),
    ("12345678901234567891", "12345678901234567890", False),           # 20 digits, off by one
    ("12345678901234567890", "12345678901234567890", True),
    ("12,345,678,901,234,567,890", "12345678901234567890", True),
    ("10^{15}+1", "1000000000000001", True),
    ("10^{15}", "1000000000000001", False),
    ("2^{64}", "18446744073709551616", True),
    ("2^{64}", "18446744073709551615", False),
    ("10^{400}", "10^{400}+1", False),                                 # past float's range
]

DECIMAL_VS_IRRATIONAL_CASES = [   # a decimal is never an exact irrational, however many digits
    ("3.14", "\\pi", False),
    ("3.1415927", "\\pi", False),                                     # math-verify would round it
    ("3.141592653589793", "\\pi", False),
    ("1.41", "\\sqrt{2}", False),
    ("1.4142136", "\\sqrt{2}", False),
    ("6.2831853", "2\\pi", False),
    ("0.8660254", "\\frac{\\sqrt{3}}{2}", False),
    ("1.26", "\\sqrt[3]{2}", False),
    ("3.1415927x", "\\pi x", False),                                  # inside an expression too
    ("1.5707963", "0.5\\pi", False),
    ("0.5\\pi", "\\frac{\\pi}{2}", True),                             # an exact decimal times pi
    ("0.5x + \\sqrt{2}", "\\frac{x}{2} + \\sqrt{2}", True),
    ("0.3333333", "\\frac{1}{3}", True),                              # a rational still rounds
    ("\\sqrt{8}", "2\\sqrt{2}", True),
]

NOTATION_CASES = [
    # repeating decimals
    ("0.\\overline{3}", "\\frac{1}{3}", True),
    ("0.1\\overline{6}", "\\frac{1}{6}", True),
    ("1.\\overline{142857}", "\\frac{8}{7}", True),
    ("0.\\overline{3}", "\\frac{1}{4}", False),
    ("0.1\\overline{6}", "0.16", False),
    # named components against a tuple, in the order of their names
    ("x = 3, y = -2", "(3,-2)", True),
    ("y = -2, x = 3", "(3, -2)", True),
    ("x = 3, y = -2", "(-2,3)", False),
    ("x=3, y=-2", "x = -2, y = 3", False),
    ("(x, y) = (3, -2)", "x = 3, y = -2", True),
    ("a = 1, b = 2, c = 3", "(1, 2, 3)", True),
    # left-hand sides dropped
    ("f^{-1}(x) = \\frac{x-3}{2}", "\\frac{x-3}{2}", True),
    ("f^{-1}(x) = \\frac{x-3}{2}", "\\frac{x+3}{2}", False),
    ("a_{n+1} = 7", "7", True),
    ("f'(x) = 2x", "2x", True),
    ("\\angle ABC = 30^\\circ", "30", True),
    ("\\overline{AB} = 5", "5", True),
    # interval unions in any order
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2,\\infty)\\cup(-\\infty,1)", True),
    ("[0,1] ∪ [2,3]", "[2, 3] \\cup [0, 1]", True),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty,1]\\cup(2,\\infty)", False),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty, 1)", False),
    # a text answer's letter case
    ("\\text{Yes}", "yes", True),
    ("EVEN", "even", True),
    ("Monday", "Tuesday", False),
    ("x", "X", False),                                                 # single letters: variables
    # small numbers in words (GSM8K)
    ("five", "5", True),
    ("Twelve", "12", True),
    ("twenty-one", "21", True),
    ("five apples", "5", True),
    ("five", "6", False),
    ("seven hundred", "7", False),
]


@pytest.mark.parametrize("checker", ["builtin", "auto"])
@pytest.mark.parametrize("pred,gold,expected", INTEGER_CASES)
def test_integers_of_any_length_are_exact(pred, gold, expected, checker):
    if checker == "auto" and not HAVE_MATH_VERIFY:
        pytest.skip("math-verify is not installed")
    assert is_equiv(pred, gold, checker=checker) is expected
    assert is_equiv(gold, pred, checker=checker) is expected


@pytest.mark.parametrize("checker", ["builtin", "auto", "math-verify"])
@pytest.mark.parametrize("pred,gold,expected", DECIMAL_VS_IRRATIONAL_CASES)
def test_a_decimal_never_equals_an_irrational(monkeypatch, pred, gold, expected, checker):
    if checker != "builtin" and not HAVE_MATH_VERIFY:
        pytest.skip("math-verify is not installed")
    monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)                  # verdicts, not speed
    assert is_equiv(pred, gold, checker=checker) is expected


@needs_math_verify
def test_math_verify_alone_would_round_a_decimal_to_pi():
    """The guard in the worker is needed: math-verify itself calls 3.1415927 and pi equal."""
    from math_verify import parse, verify
    assert verify(parse("$\\pi$"), parse("$3.1415927$"))
    assert is_equiv("3.1415927", "\\pi", checker="math-verify") is False


@pytest.mark.parametrize("pred,gold,expected", NOTATION_CASES)
def test_notations(pred, gold, expected):
    assert is_equiv(pred, gold, checker="builtin") is expected


LAST_STATED_CASES = [   # the last stated answer wins, a box or a phrase
    ("So the area is \\boxed{12}. Wait, I forgot the other faces: 6 \\cdot 12 = 72. "
     "The answer is 72.", "72"),
    ("The answer is 12. Wait, six faces: the total is \\boxed{72}.", "72"),
    ("\\boxed{12}\n\nHmm, recheck: Answer: 72", "72"),
    ("\\boxed{12}. Actually the answer is $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("\\boxed{12}. I double-checked and the answer is correct.", "12"),   # a remark, not a value
    ("\\boxed{12}. Let me verify the answer: it satisfies both equations.", "12"),
]


@pytest.mark.parametrize("text,expected", LAST_STATED_CASES)
def test_the_last_stated_answer_wins(text, expected):
    assert extract_answer(text) == expected
    assert math_reward(text, expected, checker="builtin") == 1.0


# ----------------------------------------------------------------------------
# grade: one verdict per completion, (completion, gold, last_number) -> (correct, answer, stated,
# by_last_number). The RL reward, the logged accuracy and evaluate.py's rows all come from it.

LOOP = "Kim has 5. " + "5 + 65 = 70. 70 - 5 = 65. " * 3 + "5 + 65 = 70"   # cut mid-loop
GRADE_CASES = [
    # a stated answer decides, with or without the fallback
    ("Kim has 70. The answer is \\boxed{70}.", "70", False, (True, "70", True, False)),
    ("Kim has 70. The answer is \\boxed{70}.", "70", True, (True, "70", True, False)),
    ("Natalia sold 72 clips.\n#### 72", "72", False, (True, "72", True, False)),
    ("The answer is \\boxed{7}. So 70.", "70", True, (False, "7", True, False)),   # final
    # no stated answer: wrong, or with the fallback its last number or formula
    ("So Kim has 70 apples now.", "70", False, (False, None, False, False)),
    ("So Kim has 70 apples now.", "70", True, (True, "70", False, True)),
    ("So Kim has 71 apples now.", "70", True, (False, "71", False, False)),
    ("we need $x > 2$, so x = 3 works", "3", True, (True, "3", False, True)),   # a number after it
    ("it is $\\frac{1}{2}$", "0.5", True, (True, "\\frac{1}{2}", False, True)),   # the last formula
    ("<think>the answer is 70</think> so 71", "70", True, (False, "71", False, False)),
    ("I do not know.", "70", True, (False, None, False, False)),
    (None, "70", True, (False, None, False, False)),
    # looping text cut by the token budget that happens to end on the gold: only the fallback
    # calls it right
    (LOOP, "70", False, (False, None, False, False)),
    (LOOP, "70", True, (True, "70", False, True)),
]


@pytest.mark.parametrize("completion, gold, last_number, expected", GRADE_CASES)
def test_grade(completion, gold, last_number, expected):
    verdict = rl.grade(completion, gold, checker="builtin", last_number=last_number)
    assert tuple(verdict) == expected
    assert verdict == (verdict.correct, verdict.answer, verdict.stated, verdict.by_last_number)
    assert math_reward(completion, gold, checker="builtin", last_number=last_number) == (
        1.0 if verdict.correct else 0.0)                           # the reward is this verdict


# ----------------------------------------------------------------------------
# math_reward and the TRL reward function

def test_math_reward():
    reward = lambda text, gold, **kw: math_reward(text, gold, checker="builtin", **kw)
    assert reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert reward("so \\boxed{3}", "0.5") == 0.0
    assert reward("no answer at all", "0.5") == 0.0
    assert reward("Natalia sold 72 clips.\n#### 72", "72") == 1.0
    assert reward("the roots are \\boxed{3} and \\boxed{-1}", "-1, 3") == 1.0
    assert reward("\\boxed{3} or \\boxed{4}", "4") == 0.0               # a hedge is not an answer
    assert reward("\\boxed{3}, \\boxed{4}", "4") == 0.0
    assert reward("so 24 in all", "24") == 1.0                       # no stated answer: the last number
    assert reward("so 24 in all, not 23", "24") == 0.0
    assert reward("so 24 in all", "24", last_number=False) == 0.0    # the strict reward
    assert reward("\\boxed{23}, although 24 is close", "24") == 0.0   # a stated answer is final
    turn = "A quarter turn maps (1, 0) to (0, 1): it is $\\begin{pmatrix}0 & -1 \\\\ 1 & 0\\end{pmatrix}$."
    gold = "\\begin{pmatrix}0&-1\\\\1&0\\end{pmatrix}"
    assert reward(turn, gold) == 1.0                                 # its last formula ...
    assert reward(turn.replace("-1", "1"), gold) == 0.0
    assert reward("we need $x > 2$, so x = 3 works", "3") == 1.0     # ... or its last number
    assert reward("we need $x > 2$, so x = 3 works", "x > 2") == 0.0  # one reading, not two guesses
    assert reward("we need $x > 2$, so x = 3 works", "2") == 0.0
    assert reward("so x = 3 works, as we need $x > 2$", "x > 2") == 1.0
    assert reward("so the chance is 2/3.", "\\frac{2}{3}") == 1.0       # a fraction is one number
    # the small format reward is off by default, and never more than a correct answer
    assert reward("so \\boxed{3}", "4", format_reward=0.1) == pytest.approx(0.1)
    assert reward("so 3", "4", format_reward=0.1) == 0.0
    assert reward("so \\boxed{4}", "4", format_reward=0.1) == 1.0


def test_grpo_reward_fn_accepts_strings_and_messages():
    completions = ["\\boxed{4}", "\\boxed{5}"]
    assert grpo_reward_fn(completions, answer=["4", "4"], prompts=["p", "p"]) == [1.0, 0.0]
    chat = [[{"role": "assistant", "content": "\\boxed{4}"}], [{"role": "assistant", "content": "x"}]]
    assert grpo_reward_fn(chat, answer=["4", "4"]) == [1.0, 0.0]


def test_unknown_checker_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown checker"):
        is_equiv("1", "1", checker="sympy")


def test_default_checker_and_its_description():
    assert default_checker() == ("auto" if HAVE_MATH_VERIFY else "builtin")
    assert is_equiv("\\arcsin 1", "\\frac{\\pi}{2}", checker="builtin") is False   # no arcsin
    assert checker_description("builtin") == "builtin"
    if HAVE_MATH_VERIFY:
        import importlib.metadata
        version = importlib.metadata.version("math-verify")
        assert checker_description("auto") == f"auto (builtin + math-verify {version})"
        assert checker_description("math-verify") == f"math-verify {version}"


# ----------------------------------------------------------------------------
# math-verify and auto: symbols go to math-verify, under a hard time limit in any thread

@pytest.mark.skipif(HAVE_MATH_VERIFY, reason="math-verify is installed")
def test_missing_math_verify_is_a_clear_error():
    for checker in ("math-verify", "auto"):
        with pytest.raises(ImportError, match="pip install"):
            is_equiv("0.5", "\\frac{1}{2}", checker=checker)


AUTO_CASES = [
    ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True),     # symbols: math-verify decides
    ("\\sec^2 y", "\\tan^2 y + 1", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("(x+1)^2", "x^2+1", False),
    ("14{,}916", "14916", True),                               # numbers: the builtin rules decide
    ("70001", "70000", False),
    ("\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", True),
    ("B", "C", False),
    ("x^2/16 + y^2/12 = 1/4", "x^2/4 + y^2/3 = 1", True),        # equations
    ("x + y = 1", "x + 2y = 1", False),
]


@needs_math_verify
def test_auto_checker(monkeypatch):
    monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)                   # verdicts, not speed, on a busy machine
    for pred, gold, expected in AUTO_CASES:
        assert is_equiv(pred, gold, checker="auto") is expected, (pred, gold)
    assert is_equiv("0.5", "\\frac{1}{2}", checker="math-verify")
    assert not is_equiv("0.6", "\\frac{1}{2}", checker="math-verify")


@needs_math_verify
def test_auto_reads_a_completion_that_states_no_answer_as_math_verify_does(monkeypatch):
    monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)
    log = "The exponent is the base-2 logarithm of 8, so it is $\\log_2 8$."
    assert math_reward(log, "3", checker="auto") == 1.0              # math-verify's reading and verdict
    assert math_reward(log.replace("8$", "9$"), "3", checker="auto") == 0.0
    assert math_reward(log, "3", checker="builtin") == 0.0           # no logarithms in builtin
    assert math_reward(log, "3", checker="auto", last_number=False) == 0.0
    assert math_reward("<think>it is $x+1$</think> so $2x$", "2x", checker="auto") == 1.0
    assert math_reward("<think>it is $2x$</think> so $x+1$", "2x", checker="auto") == 0.0


@needs_math_verify
def test_auto_sends_what_builtin_cannot_read_to_math_verify(monkeypatch):
    """\\sqrt[3]{8} builtin computes itself (exactly); \\arcsin and \\log go on to math-verify."""
    sent = []
    monkeypatch.setattr(rl, "_math_verify", lambda *args, **kw: sent.append(args[:2]) or True)
    assert is_equiv("\\sqrt[3]{8}", "2", checker="auto") and sent == []
    assert is_equiv("\\sqrt[3]{9}", "2", checker="auto") is False and sent == []   # exact: final
    assert is_equiv("\\arcsin 1", "\\frac{\\pi}{2}", checker="auto")
    assert sent == [("\\arcsin 1", "\\frac{\\pi}{2}")]


@needs_math_verify
@pytest.mark.parametrize("checker", ["auto", "math-verify"])
def test_a_slow_check_takes_under_a_second(monkeypatch, checker):
    """sympy takes seconds on the hard pair: the check returns within the limit (1 s with the kill
    of the late worker included), from a thread that is not the main one, and the spare worker
    answers the next check."""
    results = {}

    def judge():
        monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)
        results["warm"] = is_equiv("x + 1", "1 + x", checker="math-verify")
        is_equiv("2x", "x + x", checker="math-verify")               # the spare is up too
        monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 0.8)
        start = time.perf_counter()
        results["hard"] = is_equiv("\\sin(x)^{10000} + \\cos(x)^{10000}", "1", checker=checker)
        results["seconds"] = time.perf_counter() - start
        monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)
        results["next"] = is_equiv("2(x+1)", "2x+2", checker="math-verify")

    thread = threading.Thread(target=judge)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert results["warm"] is True
    assert results["hard"] is False and 0.8 <= results["seconds"] < 1.0
    assert results["next"] is True


@needs_math_verify
def test_the_worker_starts_at_the_first_check_not_at_import():
    code = ("import time, rl; print(len(rl._pool.workers)); start = time.perf_counter(); "
            "print(rl.is_equiv('0.5', '\\\\frac12', 'auto'), time.perf_counter() - start < 0.5, "
            "len(rl._pool.workers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["0", "True", "True", "1"], out.stderr   # started, not waited for


def test_a_worker_late_with_its_verdict_is_killed(monkeypatch):
    """A worker that never answers (a stand-in for sympy stuck where no signal reaches it): the
    call gets no verdict within the limit, and the worker is killed (the spare takes over)."""
    stuck = "import sys, time\nprint('ready', flush=True)\nfor line in sys.stdin: time.sleep(1000)\n"
    rl._stop_workers()
    monkeypatch.setattr(rl, "_WORKER_SCRIPT", stuck)
    monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 2.0)
    try:
        assert rl._math_verify("x", "x", time.monotonic()) is None      # waits for "ready" ...
        first = rl._pool.workers[0].process
        assert rl._math_verify("x", "x", time.monotonic()) is None      # ... then it is late:
        assert first.poll() is not None and first not in [w.process for w in rl._pool.workers]
    finally:
        rl._stop_workers()


@needs_math_verify
def test_auto_from_several_threads_at_once(monkeypatch):
    """The workers are shared under a lock: concurrent callers each get their own verdict."""
    monkeypatch.setattr(rl, "_CHECK_LIMIT_S", 60.0)
    cases = [("(x+1)^2", "x^2+2x+1", True), ("(x+1)^2", "x^2+1", False),
             ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True), ("2y", "y+y+1", False)] * 2
    results = [None] * len(cases)

    def judge(i):
        results[i] = is_equiv(cases[i][0], cases[i][1], checker="auto")

    threads = [threading.Thread(target=judge, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == [expected for _, _, expected in cases]


@needs_math_verify
def test_hostile_symbolic_inputs_with_auto_never_raise_or_hang():
    """Each returns within the 1 s limit, whatever state the workers are in."""
    for pred in ("x^{9^{9^{9}}}", "\\sin(x)^{10000}+\\cos(x)^{10000}", "x" * 900, "\\frac{" * 200 + "x"):
        start = time.perf_counter()
        assert isinstance(is_equiv(pred, "y^2", checker="auto"), bool)
        assert time.perf_counter() - start < 1.0


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
    "\\boxed{1} and " * 100_000,                       # many boxes that could be joined
    "####\n" * 200_000,
    "The answer is 1. " * 60_000,
    "Answer: " * 100_000,
    "<answer>" * 100_000 + "</answer>" * 100_000,
    "</think>" * 100_000,
    "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",   # deeply nested but balanced
    "(" * 100_000 + "1" + ")" * 100_000,
    "{" * 100_000 + "1" + "}" * 100_000,
    "1" * MEGA,                                         # a megabyte number
    "the answer is " + " " * MEGA,
    "#### " + "9" * MEGA,
    "x" * MEGA,
    "x = " * 200,
    "\\begin{pmatrix}" * 100 + "1" + "\\end{pmatrix}" * 100,
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
    for last_number in (False, True):
        answer = extract_answer(text, last_number=last_number)
        assert answer is None or isinstance(answer, str)
    for pred in (text, f"\\boxed{{{text}}}", answer):
        for gold in ("1", text):
            assert isinstance(is_equiv(pred, gold, checker="builtin"), bool)
    assert math_reward(text, "1", checker="builtin") in (0.0, 1.0)
    assert math_reward(f"\\boxed{{{text}}}", text[:100], checker="builtin") in (0.0, 1.0)
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
        is_equiv(text, "1", checker="builtin")
        is_equiv("1", text, checker="builtin")
        math_reward(text, text, checker="builtin")
    assert not marker.exists()


# ----------------------------------------------------------------------------
# cases found in review: each was read wrongly before its fix

@pytest.mark.parametrize("completion, expected", [
    # a later answer phrase overrides a box with the value it states first, not a sentence's last
    ("Thus \\boxed{10}. The answer is 10 apples, which is 2 more than Tom's 8.", "10"),
    ("So there are $\\boxed{3}$ ways. The answer is 3 when order does not matter, versus 6.", "3"),
    ("Hence \\boxed{24}. The answer is 24 hours, i.e. 1 day.", "24"),
    ("so $\\boxed{5}$. The answer is 5 because 2+3=5.", "5"),
    ("\\boxed{5}. The answer is 1,250 apples.", "1250"),
    ("\\boxed{5}. Wait, that is wrong. The answer is 72.", "72"),      # still: the last statement
])
def test_a_phrase_after_a_box_gives_the_value_it_states_first(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("checker", ["builtin", "auto"])
@pytest.mark.parametrize("pred, gold, expected", [
    ("\\sqrt{2}\\cdot\\sqrt{8}", "4", True),         # computed through irrationals, yet rational
    ("(\\sqrt{3})^2", "3", True),
    ("\\frac{\\sqrt{8}}{\\sqrt{2}}", "2", True),
    ("1.5\\pi", "\\frac{3\\pi}{2}", True),            # a decimal times an irrational, both sides
    ("3.141592653589793", "\\pi", False),            # a written decimal is never an irrational
    ("one half", "1", False),                        # a number word before a fraction word
    ("two thirds", "2", False),
    ("zero point five", "0", False),
    ("5 million", "5", False),                       # ... or before a scale word
    ("3 thousand", "3", False),
    ("10 apples", "10", True),                       # other words after a number still go
    ("r = 3, \\theta = \\frac{\\pi}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # as written
    ("y = -2, x = 3", "(3,-2)", True),               # single Latin letters: alphabetical
])
def test_review_cases(pred, gold, expected, checker):
    if checker == "auto" and importlib.util.find_spec("math_verify") is None:
        pytest.skip("auto needs math-verify")
    assert is_equiv(pred, gold, checker=checker) is expected
