r"""Verifiers against adversarial completions; user reward functions by path, with timeouts.

Each table row is (completion, reference, expected score) and says one rule of
the module docstring: equal values in other forms, wrong but similar strings,
two answers (the last counts), no answer, huge numbers, unicode digits.
"""

import textwrap
import threading

import pytest

from deepseek_jax.rl import evaluation, verifiers


def box(s):
  return f"Some reasoning first. \\boxed{{{s}}}"


MATH = [
    # equal values written differently
    (box("0.5"), "1/2", 1.0),
    (box("\\frac{1}{2}"), "0.5", 1.0),
    (box("\\dfrac12"), ".5", 1.0),
    (box("\\tfrac{2}{4}"), "\\frac{1}{2}", 1.0),
    (box("x = \\frac12"), "0.5", 1.0),
    (box("x_1 = 5"), "5", 1.0),
    (box("\\theta = 90^\\circ"), "90", 1.0),
    (box("$0.5$"), "1/2", 1.0),
    (box("\\left( \\frac{1}{2} \\right)"), "0.5", 1.0),
    (box("0405"), "405", 1.0),
    (box("4.05e2"), "405", 1.0),
    (box("-\\frac{1}{2}"), "-0.5", 1.0),
    (box("\\frac{-1}{2}"), "-1/2", 1.0),
    (box("0.1+0.2"), "0.3", 1.0),
    (box("2^{10}"), "1024", 1.0),
    (box("1,000"), "1000", 1.0),
    (box("1,\\!000,\\!000"), "1000000", 1.0),
    (box("1{,}000"), "1000", 1.0),
    (box("\\sqrt{8}"), "2\\sqrt{2}", 1.0),
    (box("\\frac{4}{\\sqrt2}"), "2\\sqrt{2}", 1.0),
    (box("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", 1.0),
    (box("\\sqrt{\\frac{1}{2}}"), "\\frac{\\sqrt2}{2}", 1.0),
    (box("1+\\sqrt{2}"), "\\sqrt{2} + 1", 1.0),
    (box("\\sqrt{999966000289}"), "999983", 1.0),          # a prime squared, > 1e4^2
    (box("5 cm"), "5", 1.0),
    (box("5cm"), "5", 1.0),
    (box("5 \\text{ apples}"), "5", 1.0),
    (box("12 square units"), "12", 1.0),
    (box("3 \\mbox{cm}^2"), "3", 1.0),
    (box("90^\\circ"), "90", 1.0),
    (box("90^{\\circ}"), "90", 1.0),
    (box("50\\%"), "50", 1.0),
    (box("\\$5"), "5", 1.0),
    (box("The answer is 7"), "7", 1.0),
    (box("\\pi/2"), "\\pi / 2", 1.0),                      # not a value: same text
    ("<think>draft</think> <answer> 2/4 </answer>", "0.5", 1.0),
    ("The answer is \\boxed{\\boxed{5}}", "5", 1.0),           # nested boxes
    (box("\\{1, 2\\}"), "\\{1,2\\}", 1.0),                   # escaped braces in a box
    (box("7"), "\\boxed{7}", 1.0),                           # a boxed reference
    # wrong but similar
    (box("12"), "121", 0.0),
    (box("121"), "12", 0.0),
    (box("1/2"), "12", 0.0),
    (box("1,2"), "12", 0.0),
    (box("(1,2)"), "12", 0.0),
    (box("1 2"), "12", 0.0),
    (box("0.333"), "1/3", 0.0),
    (box("1.41421356"), "\\sqrt{2}", 0.0),
    (box("\\sqrt{2}"), "2", 0.0),
    (box("-5"), "5", 0.0),
    (box("50\\%"), "0.5", 0.0),                              # percent is a unit, not /100
    (box("2x"), "2", 0.0),
    (box("x = 3, y = 4"), "4", 0.0),
    (box("x = 3, y = 4"), "x=3,y=4", 1.0),                  # not a value: same text
    (box("2\\frac12"), "2.5", 0.0),                          # not a mixed number
    (box("\\frac{1}{2} + \\frac{1}{3}"), "1/6", 0.0),
    # two answers: the last counts
    ("First \\boxed{3}, no wait: \\boxed{4}.", "4", 1.0),
    ("First \\boxed{3}, no wait: \\boxed{4}.", "3", 0.0),
    ("<answer>3</answer> hmm <answer>4</answer>", "4", 1.0),
    ("<think>so \\boxed{3}</think><answer>4</answer>", "4", 1.0),  # draft box in the reasoning
    ("\\boxed{4} then a truncated \\boxed{3", "4", 1.0),      # an unclosed box is ignored
    ("a box \\boxed{3} beats the answer block <answer>4</answer>", "3", 1.0),
    # no answer
    ("I think it is 5.", "5", 0.0),
    ("<answer>5", "5", 0.0),
    ("", "5", 0.0),
    # huge numbers: refused or compared as text, never expanded
    (box("1e999999"), "1", 0.0),
    (box("1e999999"), "1e999999", 1.0),
    (box("10^{10^{10}}"), "1", 0.0),
    (box("(10^{60})^{60}"), "1", 0.0),
    (box("9" * 10000), "9" * 10000, 1.0),
    (box("9" * 10000), "9" * 9999, 0.0),
    (box("9" * 10000), "12", 0.0),
    ("\\boxed{" * 5000 + "1" + "}" * 5000, "1", 1.0),
    # unicode digits are not numbers
    (box("١٢"), "12", 0.0),
    (box("１２"), "12", 0.0),
    (box("12"), "١٢", 0.0),
]


@pytest.mark.parametrize("completion,answer,expected", MATH,
                         ids=[f"{i}:{c[-30:]!r}~{a[:12]!r}" for i, (c, a, _) in enumerate(MATH)])
def test_math_verifier_table(completion, answer, expected):
  assert verifiers.math(completion, answer) == expected


@pytest.mark.parametrize("answer", ["", "   ", "$ $", "\\boxed{}"])
def test_math_unusable_reference_scores_none(answer):
  assert verifiers.math(box("5"), answer) is None


CHOICE = [
    ("The answer is (B).", "B", 1.0),
    ("B) is right", "B", 1.0),
    ("The answer is b", "B", 1.0),
    ("Answer: **C**", "C", 1.0),
    ("Final: \\boxed{C}", "C", 1.0),
    ("\\boxed{\\text{(C)}}", "(C)", 1.0),
    ("B. 42", "b", 1.0),
    ("option D fits", "D", 1.0),
    ("I first thought (A). Wait, actually (C) is right.", "C", 1.0),
    ("I first thought (A). Wait, actually (C) is right.", "A", 0.0),
    ("A) 3 B) 4 C) 5. The answer is B", "B", 1.0),
    ("Option (A) looks wrong; the answer is E", "E", 1.0),
    ("\\boxed{42}", "B", 0.0),                           # a box without a letter
    ("The answer is a number I cannot find.", "A", 0.0),   # the article, not a choice
    ("no letter stated here", "A", 0.0),
    ("The answer is (F).", "F", None),                      # F is not a choice: unusable
    ("The answer is (B).", "42", None),
]


@pytest.mark.parametrize("completion,answer,expected", CHOICE)
def test_choice_verifier_table(completion, answer, expected):
  assert verifiers.choice(completion, answer) == expected


EXACT = [
    ("  New   York ", "New York", 1.0),
    ("<answer>\n New\tYork </answer>", "New York", 1.0),
    ("It is \\boxed{Paris}", "Paris", 1.0),
    ("It is \\boxed{Paris}", "paris", 0.0),
    ("New York City", "New York", 0.0),
    ("\\boxed{12}", "121", 0.0),
    ("anything", "  ", None),
]


@pytest.mark.parametrize("completion,answer,expected", EXACT)
def test_exact_verifier_table(completion, answer, expected):
  assert verifiers.exact(completion, answer) == expected


REGEX = [
    ("\\boxed{12}", r"1[0-9]", 1.0),
    ("\\boxed{121}", r"1[0-9]", 0.0),                   # fullmatch, not search
    ("<answer> 3.14 </answer>", r"3\.14\d*", 1.0),
    ("The colour is grey", r".*gr[ae]y", 1.0),
    ("\\boxed{x}", r"(unclosed", None),
    ("\\boxed{x}", r"*", None),
]


@pytest.mark.parametrize("completion,answer,expected", REGEX)
def test_regex_verifier_table(completion, answer, expected):
  assert verifiers.regex(completion, answer) == expected


def test_registry_and_get():
  assert set(verifiers.VERIFIERS) == {"math", "choice", "exact", "regex"}
  for name, fn in verifiers.VERIFIERS.items():
    assert verifiers.get(name) is fn is getattr(verifiers, name)
  with pytest.raises(ValueError, match="known: choice, exact, math, regex"):
    verifiers.get("maths")


def test_answer_keys_group_equal_values_for_majority_vote():
  samples = [box("3"), box("0.5"), "no answer", box("\\frac12"), box("3.0"), box("1/2")]
  key = lambda c: verifiers.answer_key("math", c)  # noqa: E731
  assert evaluation.majority_vote(samples, key=key) == box("0.5")        # 3 votes to 2
  flags = [verifiers.math(c, "1/2") for c in samples]
  assert evaluation.cons_at_k(samples, flags, key=key) == 1.0
  assert verifiers.answer_key("choice", "so (b)") == verifiers.answer_key("choice", "\\boxed{B}")
  assert verifiers.answer_key("math", "no answer") is None


# ---------------------------------------------------------------- user reward functions

@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
      def length_bonus(completion, answer):
        return min(len(completion), 10) / 10

      class Scorer:
        @staticmethod
        def score(completion, answer):
          return float(completion == answer)

      NOT_CALLABLE = 3
      """))
  monkeypatch.syspath_prepend(str(tmp_path))
  return "my_rewards_mod"


def test_load_reward_fn_imports_by_path(user_module):
  fn = verifiers.load_reward_fn(f"{user_module}:length_bonus")
  assert fn("abcde", "x") == 0.5
  assert verifiers.load_reward_fn(f"{user_module}:Scorer.score")("a", "a") == 1.0


@pytest.mark.parametrize("path,message", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", "is a int, not callable"),
    ("{mod}", "package.module:function"),
    (":fn", "package.module:function"),
])
def test_load_reward_fn_errors_name_the_path(user_module, path, message):
  path = path.format(mod=user_module)
  with pytest.raises(ValueError, match=message) as err:
    verifiers.load_reward_fn(path)
  assert repr(path) in str(err.value)


def test_call_with_timeout_scores_values_and_errors():
  assert verifiers.call_with_timeout(lambda c, a: c == a, "x", "x", 5.0) == (1.0, None)
  assert verifiers.call_with_timeout(verifiers.math, box("1/2"), "0.5", None) == (1.0, None)
  assert verifiers.call_with_timeout(lambda c, a: None, "x", "x", 5.0) == (None, None)
  value, error = verifiers.call_with_timeout(lambda c, a: 1 / 0, "x", "x", 5.0)
  assert value is None and error.startswith("ZeroDivisionError: division by zero")
  value, error = verifiers.call_with_timeout(lambda c, a: float("nan"), "x", "x", None)
  assert value is None and error.startswith("ValueError")
  value, error = verifiers.call_with_timeout(lambda c, a: "1.0", "x", "x", 5.0)
  assert value is None and error.startswith("TypeError")
  with pytest.raises(ValueError, match="positive"):
    verifiers.call_with_timeout(lambda c, a: 1.0, "x", "x", 0)


def test_call_with_timeout_abandons_a_hung_function():
  release, started = threading.Event(), threading.Event()

  def hangs(completion, answer):
    started.set()
    release.wait(60)                  # "hangs" until the test lets it go
    return 1.0

  value, error = verifiers.call_with_timeout(hangs, "x", "x", 0.05)
  release.set()                       # the abandoned thread ends now
  assert started.is_set()
  assert value is None and error.startswith("TimeoutError") and "0.05 s" in error
