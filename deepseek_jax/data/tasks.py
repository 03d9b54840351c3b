"""Verifiable arithmetic problems with worked solutions: the embedded default corpus.

The project trains without network access, so its default job learns a task the
project generates itself. DeepSeek-R1 (sec. 2.2) trains reasoning with
*rule-based* rewards on problems whose answer can be checked exactly; this file
makes such problems and holds the rule-based checks (`extract_answer`,
`is_correct`, `format_ok`) that SFT evaluation and GRPO rewards reuse.

Each problem carries a column-by-column worked solution in the style a pupil
writes it. Every line handles one column, least significant first, and ends with
the partial result so far, so the final answer is a copy of the last partial
(leading zeros dropped):

    347+58   ->  7+8+0=15 -> 5          (the carry is the tens digit of 15)
                 4+5+1=10 -> 05
                 3+0+1=4 -> 405         answer: 405
    405-398  ->  5-8-0=-3 -> 7          (a negative column means borrow 1)
                 0-9-1=-10 -> 07
                 4-3-1=0 -> 007         answer: 7
    347*8    ->  7*8+0=56 -> 6
                 4*8+5=37 -> 76
                 3*8+3=27 -> 776
                 0*8+2=2 -> 2776        answer: 2776

Kinds: "add", "sub" (never negative: operands are ordered), "mul" (a number times
one digit 1-9), "chain" ("a+b-c", two steps left to right, each step worked as
above under a header "a+b:"; intermediates never go negative). Prompts are valid
Python expressions, so `eval(prompt)` is an independent oracle for the answer.

"countdown" is the harder search task (Countdown, as in TinyZero's R1-Zero
replication): "make 46 with 3 7 25" asks for an expression that uses each
given number exactly once, with + - * and parentheses, and equals the target.
Many answers are right, so it is checked by `countdown_correct` (the
expression is parsed, never eval'ed: numbers, + - * and parentheses only),
not by string equality; the stored answer is one of them (the one the
numbers were drawn with; the prompt lists the numbers sorted, so their order
does not give it away) and the worked solution its steps, one per line
("3+7=10", "10*25=250"... no column arithmetic: the point is the search).
Numbers have 1..max_digits digits; every intermediate is >= 0 and the target
< 10**(max_digits + 1).

"passkey" is the long-context kind (the retrieval test used to check context
extension, e.g. after YaRN): a haystack of repeated filler sentences with one
"The pass key is 48213. Remember it. 48213 is the pass key." at a random
sentence boundary, then "What is the pass key?". The worked solution is empty
and the answer is the 5-digit key. `context_chars` sets the prompt length:
test prompts are that long (the key at any depth), training prompts between a
quarter of it and all of it.

`max_digits` is the difficulty knob: each operand first draws its digit count
uniformly from 1..max_digits, so short and long numbers are equally common.

The "train" and "test" splits are a partition of the prompt space by a hash of
the prompt (`split_of`), so no seed or size can make them share a prompt.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import re
from typing import Sequence

import numpy as np

R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>. User: {prompt}. Assistant:"
)
# The tiny CPU model cannot afford ~300 characters of preamble per document.
SHORT_TEMPLATE = "User: {prompt}\nAssistant:"
TEMPLATES = {"short": SHORT_TEMPLATE, "r1": R1_TEMPLATE}

ARITHMETIC_KINDS = ("add", "sub", "mul", "chain")
# Kinds with a verifiable answer and a worked solution (SFT, GRPO, rejection sampling).
VERIFIABLE_KINDS = ARITHMETIC_KINDS + ("countdown",)
KINDS = VERIFIABLE_KINDS + ("passkey",)
DEFAULT_KINDS = ("add", "sub", "mul")
SPLITS = ("train", "test")
TEST_PERCENT = 10  # share of the prompt space held out for evaluation


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str  # a Python expression, e.g. "347+58"
    reasoning: str  # worked solution, one line per column
    answer: str  # canonical decimal integer, e.g. "405"


# ----------------------------------------------------------------------------
# Worked solutions


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n, least significant first, zero-padded to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def _add_lines(a: int, b: int) -> list[str]:
    lines, partial, carry = [], "", 0
    width = max(len(str(a)), len(str(b)))
    for da, db in zip(_digits(a, width), _digits(b, width)):
        s = da + db + carry
        partial = str(s % 10) + partial
        lines.append(f"{da}+{db}+{carry}={s} -> {partial}")
        carry = s // 10
    if carry:
        partial = str(carry) + partial
        lines.append(f"0+0+{carry}={carry} -> {partial}")
    return lines


def _sub_lines(a: int, b: int) -> list[str]:
    assert a >= b, (a, b)
    lines, partial, borrow = [], "", 0
    width = len(str(a))
    for da, db in zip(_digits(a, width), _digits(b, width)):
        x = da - db - borrow
        partial = str(x % 10) + partial
        lines.append(f"{da}-{db}-{borrow}={x} -> {partial}")
        borrow = 1 if x < 0 else 0
    return lines


def _mul_lines(a: int, d: int) -> list[str]:
    lines, partial, carry = [], "", 0
    for da in _digits(a, len(str(a))):
        p = da * d + carry
        partial = str(p % 10) + partial
        lines.append(f"{da}*{d}+{carry}={p} -> {partial}")
        carry = p // 10
    if carry:
        partial = str(carry) + partial
        lines.append(f"0*{d}+{carry}={carry} -> {partial}")
    return lines


_STEP_LINES = {"+": _add_lines, "-": _sub_lines, "*": _mul_lines}
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def solve(expression: str) -> Problem:
    """Works `expression` ("a op b" or "a op b op c", left to right) into a Problem.

    Raises ValueError for anything else, or when a step would go negative.
    """
    tokens = re.fullmatch(r"(\d+)([+\-*])(\d+)(?:([+\-])(\d+))?", expression)
    if tokens is None:
        raise ValueError(
            f"expression={expression!r} is not 'a op b' or 'a op b op c' with "
            "non-negative integers and op in + - * (no spaces)")
    a, op1, b, op2, c = tokens.groups()
    steps = [(int(a), op1, int(b))]
    if op2 is not None:
        steps.append((None, op2, int(c)))
    lines, value = [], None
    for x, op, y in steps:
        x = value if x is None else x
        result = _APPLY[op](x, y)
        if result < 0:
            raise ValueError(f"expression={expression!r}: step {x}{op}{y} is negative; "
                             "order the operands so every step stays >= 0")
        if op == "*" and not 0 <= y <= 9:
            raise ValueError(f"expression={expression!r}: the multiplier must be one digit")
        if len(steps) > 1:
            lines.append(f"{x}{op}{y}:")
        lines.extend(_STEP_LINES[op](x, y))
        value = result
    return Problem(prompt=expression, reasoning="\n".join(lines), answer=str(value))


# ----------------------------------------------------------------------------
# Generation


def kind_of(problem: Problem) -> str:
    """The kind (KINDS) a generated problem was drawn as, read off its prompt."""
    if problem.prompt.endswith(_QUESTION):
        return "passkey"
    if is_countdown(problem.prompt):
        return "countdown"
    ops = re.findall(r"[+\-*]", problem.prompt)
    if len(ops) == 2:
        return "chain"
    return {"+": "add", "-": "sub", "*": "mul"}[ops[0]]


def split_of(prompt: str) -> str:
    """'test' for TEST_PERCENT% of all prompts (by a stable hash), else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return "test" if h % 100 < TEST_PERCENT else "train"


def _number(rng: np.random.Generator, max_digits: int) -> int:
    k = int(rng.integers(1, max_digits + 1))
    low = 0 if k == 1 else 10 ** (k - 1)
    return int(rng.integers(low, 10**k))


def _expression(rng: np.random.Generator, kind: str, max_digits: int) -> str:
    if kind == "add":
        return f"{_number(rng, max_digits)}+{_number(rng, max_digits)}"
    if kind == "sub":
        a, b = sorted((_number(rng, max_digits), _number(rng, max_digits)), reverse=True)
        return f"{a}-{b}"
    if kind == "mul":
        return f"{_number(rng, max_digits)}*{int(rng.integers(1, 10))}"
    # chain: redraw until no step goes negative (at most a few draws on average).
    while True:
        a, b, c = (_number(rng, max_digits) for _ in range(3))
        op1, op2 = ("+", "-")[int(rng.integers(2))], ("+", "-")[int(rng.integers(2))]
        first = a + b if op1 == "+" else a - b
        if first >= 0 and (first + c if op2 == "+" else first - c) >= 0:
            return f"{a}{op1}{b}{op2}{c}"


# ----------------------------------------------------------------------------
# Countdown

_COUNTDOWN = re.compile(r"make (\d+) with (\d+(?: \d+)+)")
_COUNTDOWN_CHARS = re.compile(r"[0-9+\-*() ]+")
COUNTDOWN_NUMBERS = 3
MAX_EXPRESSION_CHARS = 64


def countdown_problem(rng: np.random.Generator, max_digits: int) -> Problem:
    """One Countdown problem (module doc): COUNTDOWN_NUMBERS numbers combined
    left to right by random operators, redrawn until every step is >= 0 and
    the target < 10**(max_digits + 1)."""
    while True:
        nums = [max(_number(rng, max_digits), 1) for _ in range(COUNTDOWN_NUMBERS)]
        ops = [("+", "-", "*")[int(rng.integers(3))] for _ in range(COUNTDOWN_NUMBERS - 1)]
        value, expr, lines, ok = nums[0], str(nums[0]), [], True
        for op, y in zip(ops, nums[1:]):
            new = _APPLY[op](value, y)
            if new < 0 or new >= 10 ** (max_digits + 1):
                ok = False
                break
            lines.append(f"{value}{op}{y}={new}")
            # Left to right: a product after a sum or difference needs parentheses.
            expr = f"({expr}){op}{y}" if op == "*" and any(c in expr for c in "+-") else (
                f"{expr}{op}{y}")
            value = new
        if ok:
            prompt = f"make {value} with {' '.join(str(n) for n in sorted(nums))}"
            return Problem(prompt=prompt, reasoning="\n".join(lines), answer=expr)


def _value(node, used: list[int]) -> int:
    """The integer value of a parsed + - * expression; collects its numbers."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
        a, b = _value(node.left, used), _value(node.right, used)
        return a + b if isinstance(node.op, ast.Add) else (
            a - b if isinstance(node.op, ast.Sub) else a * b)
    raise ValueError("not a + - * expression of integers")


def is_countdown(prompt: str) -> bool:
    return _COUNTDOWN.fullmatch(prompt) is not None


def countdown_correct(prompt: str, expression: str | None) -> bool:
    """Whether `expression` uses each number of the Countdown `prompt` exactly
    once (+ - * and parentheses only) and equals its target."""
    match = _COUNTDOWN.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt={prompt!r} is not a countdown prompt ('make T with a b c')")
    if (expression is None or len(expression) > MAX_EXPRESSION_CHARS
            or not _COUNTDOWN_CHARS.fullmatch(expression)):
        return False
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        used: list[int] = []
        value = _value(tree.body, used)
    except (SyntaxError, ValueError, RecursionError):
        return False
    want = sorted(int(n) for n in match.group(2).split())
    return sorted(used) == want and value == int(match.group(1))


_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
           "Here we go.", "There and back again.")
_QUESTION = " What is the pass key?"
PASSKEY_MIN_CHARS = 100


def passkey_problem(rng: np.random.Generator, context_chars: int) -> Problem:
    """One passkey prompt of about `context_chars` characters (never more)."""
    key = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    room = context_chars - len(needle) - len(_QUESTION) - 1
    if room < 0:
        raise ValueError(f"context_chars={context_chars} is shorter than the passkey "
                         f"needle and question; use >= {PASSKEY_MIN_CHARS}")
    sentences, used, i = [], 0, 0
    while used + len(_FILLER[i % len(_FILLER)]) + 1 <= room:
        sentences.append(_FILLER[i % len(_FILLER)])
        used += len(sentences[-1]) + 1
        i += 1
    depth = int(rng.integers(len(sentences) + 1))
    text = " ".join(sentences[:depth] + [needle] + sentences[depth:]) + _QUESTION
    return Problem(prompt=text, reasoning="", answer=key)


class TooFewProblems(ValueError):
    """The split's prompt space holds fewer distinct problems than asked for
    (`found` of `n`); trainers re-raise it naming their config field."""

    def __init__(self, message: str, *, n: int, found: int, split: str):
        super().__init__(message)
        self.n, self.found, self.split = n, found, split


def generate_problems(n: int, *, seed: int, split: str = "train", max_digits: int = 3,
                      kinds: Sequence[str] = DEFAULT_KINDS,
                      context_chars: int = 256) -> list[Problem]:
    """n distinct problems of the given split, deterministic in all arguments.

    Kinds are drawn uniformly per problem; `context_chars` is the passkey
    prompt length (test split; training prompts draw theirs from
    [context_chars // 4, context_chars]). Raises ValueError when the split of
    the prompt space holds fewer than n distinct problems.
    """
    _check_problem_args(split, max_digits, kinds, context_chars)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    seen: set[str] = set()
    problems: list[Problem] = []
    misses, max_misses = 0, 1000 + 100 * n
    while len(problems) < n:
        kind = kinds[int(rng.integers(len(kinds)))]
        problem = _draw(rng, kind, split, max_digits, context_chars)
        if problem is None or problem.prompt in seen:
            misses += 1
            if misses > max_misses:
                raise TooFewProblems(
                    f"n={n}: found only {len(problems)} distinct {split!r} problems with "
                    f"max_digits={max_digits}, kinds={tuple(kinds)}; raise max_digits, "
                    "add kinds or lower n", n=n, found=len(problems), split=split)
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def _check_problem_args(split: str, max_digits: int, kinds: Sequence[str],
                        context_chars: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if max_digits < 1:
        raise ValueError(f"max_digits={max_digits} must be >= 1")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds={tuple(kinds)} must be a non-empty subset of {KINDS}")
    if "passkey" in kinds and context_chars < PASSKEY_MIN_CHARS:
        raise ValueError(f"context_chars={context_chars} must be >= {PASSKEY_MIN_CHARS} "
                         "for the passkey kind")


def _draw(rng: np.random.Generator, kind: str, split: str, max_digits: int,
          context_chars: int) -> Problem | None:
    """One random problem of `kind`, or None when it falls in the other split."""
    if kind == "passkey":
        chars = context_chars if split == "test" else int(
            rng.integers(max(PASSKEY_MIN_CHARS, context_chars // 4), context_chars + 1))
        problem = passkey_problem(rng, chars)
        return problem if split_of(problem.prompt) == split else None
    if kind == "countdown":
        problem = countdown_problem(rng, max_digits)
        return problem if split_of(problem.prompt) == split else None
    expr = _expression(rng, kind, max_digits)
    return solve(expr) if split_of(expr) == split else None


KIND_MIXES = ("distinct", "uniform")


def mixed_problems(n: int, *, seed: int, split: str = "train", max_digits: int = 3,
                   kinds: Sequence[str] = DEFAULT_KINDS, context_chars: int = 256,
                   kind_mix: str = "distinct") -> list[Problem]:
    """n training problems with the given mix of kinds.

    "distinct": `generate_problems` (n distinct problems, each drawn as a
    uniform kind; a kind whose prompt space is small, like "mul" at
    max_digits=2 with ~900 prompts, ends up under-represented once its
    space runs out). "uniform": every kind gets the same share (n //
    len(kinds), the first n % len(kinds) kinds one more), as the held-out
    problems have: distinct problems of that kind while its split of the
    prompt space has new ones, then those problems again in a shuffled
    order. Deterministic in all arguments; the result is shuffled.
    """
    if kind_mix not in KIND_MIXES:
        raise ValueError(f"kind_mix={kind_mix!r} must be one of {KIND_MIXES}")
    if kind_mix == "distinct":
        return generate_problems(n, seed=seed, split=split, max_digits=max_digits, kinds=kinds,
                                 context_chars=context_chars)
    _check_problem_args(split, max_digits, kinds, context_chars)
    rng = np.random.default_rng([seed, SPLITS.index(split), len(kinds)])
    out: list[Problem] = []
    for i, kind in enumerate(kinds):
        want = n // len(kinds) + (i < n % len(kinds))
        kind_rng = np.random.default_rng([seed, SPLITS.index(split), KINDS.index(kind) + 1])
        got: list[Problem] = []
        seen: set[str] = set()
        misses = 0      # the space counts as exhausted after 2000 draws in a row without a new one
        while len(got) < want and misses < 2000:
            one = _draw(kind_rng, kind, split, max_digits, context_chars)
            if one is None or one.prompt in seen:
                misses += 1
                continue
            misses = 0
            seen.add(one.prompt)
            got.append(one)
        if want and not got:
            raise ValueError(f"kind {kind!r} has no {split!r} problems with "
                             f"max_digits={max_digits}")
        while len(got) < want:       # the kind's problems again, each round in a new order
            got += [got[j] for j in rng.permutation(len(seen))][:want - len(got)]
        out += got
    return [out[j] for j in rng.permutation(len(out))]


# ----------------------------------------------------------------------------
# Formatting and rule-based rewards (R1 sec. 2.2.2)


def format_prompt(problem: Problem, template: str = "short") -> str:
    """The user turn, ending where the assistant starts writing."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} must be one of {tuple(TEMPLATES)}")
    return TEMPLATES[template].format(prompt=problem.prompt)


def format_completion(problem: Problem) -> str:
    """The target assistant turn: ' <think>{reasoning}</think> <answer>{answer}</answer>'."""
    return f" <think>{problem.reasoning}</think> <answer>{problem.answer}</answer>"


_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def extract_answer(completion: str) -> str | None:
    """Stripped content of the first <answer>...</answer> pair, or None."""
    match = _ANSWER.search(completion)
    return None if match is None else match.group(1).strip()


def is_correct(completion: str, problem: Problem) -> bool:
    """Accuracy reward: the extracted answer equals problem.answer exactly
    (Countdown: any expression `countdown_correct` accepts)."""
    if kind_of(problem) == "countdown":
        return countdown_correct(problem.prompt, extract_answer(completion))
    return extract_answer(completion) == problem.answer


def format_ok(completion: str) -> bool:
    """Format reward: exactly '<think>...</think> <answer>...</answer>'.

    Whitespace around and between the two blocks is allowed; each tag must occur
    once and the answer must be non-empty.
    """
    match = _FORMAT.fullmatch(completion)
    if match is None or any(completion.count(tag) != 1 for tag in _TAGS):
        return False
    return bool(match.group(2).strip())
