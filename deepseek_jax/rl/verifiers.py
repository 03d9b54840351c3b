r"""Answer verifiers: score a completion against a dataset's reference answer.

Each verifier is a pure function `(completion_text, answer) -> float | None`:
1.0 when the completion's final answer is right, 0.0 when it is wrong or
missing, None when it cannot be scored (the reference `answer` itself is
unusable). The names are public API (`VERIFIERS`, `get(name)`):

  math    the final answer (see `extract_answer`) equals the reference BY
          VALUE: "0.5", "1/2", "\frac{1}{2}", "\dfrac12", "x = .5", "$0.5$"
          are one value; "\sqrt{8}" == "2\sqrt{2}" == "\frac{4}{\sqrt2}"
  choice  a multiple-choice letter A-E: "(B)", "B)", "B. text", "The answer
          is b", "Answer: B", "\boxed{C}"; the last stated letter counts
  exact   the final answer (or the whole text when there is none) equals the
          reference after stripping and collapsing whitespace to one space
  regex   the reference is a regular expression that must fullmatch that
          same (stripped, collapsed) text; an invalid expression scores None

Final answer (`extract_answer`): the LAST complete `\boxed{...}` (or
`\fbox{...}`; balanced braces, nesting allowed, `\{ \}` escaped; with nested
boxes the innermost, an unclosed box is ignored), else the content of the last
`<answer>...</answer>` block. Text after the last `</think>` is searched first,
so a draft answer boxed inside the reasoning never beats the one after it.
`math` scores a completion without a final answer 0.0 (no whole-text guess).

How `math` reads a value (both the completion's answer and the reference;
a boxed reference is unboxed first):
  - removed first: `$`, `\(` `\)` `\[` `\]`, `\left` `\right`, `\! \, \; \:`,
    `~`, `\displaystyle`, `\$`; `\text{..}`, `\mathrm{..}`, `\mbox{..}` (and
    bf/rm/it variants) are unwrapped; `\dfrac` `\tfrac` read as `\frac`;
    `{,}` as a comma;
  - a leading "the (final) answer is" / "answer:", and a leading "name ="
    ("x = 5", "x_1 = 5", "\theta = 5", "area = 5"); "x = 3, y = 4" keeps
    ", y = 4" (so it is not 4), "x = 2 + 3 = 5" is not read;
  - degrees (`^\circ`, `^{\circ}`, `\circ`, `°`) and percent signs: "50\%"
    equals 50, NOT 0.5 (references are written without the sign; a dataset
    that wants 0.5 writes 0.5 and a "50%" answer scores 0.0);
  - trailing words separated by a space ("5 cm", "5 apples", "12 square
    units", "3 cm^2"), and a few unit symbols glued to a number ("5cm", "2kg":
    cm mm km m kg mg g ml s min h ft in lb oz); "2x" keeps its x (not a unit);
  - numbers: ASCII digits and signs only ("١٢" and "１２" are not 12, "−1"
    with U+2212 is not -1), optional decimal point and exponent ("4.05e2"),
    thousands commas in groups of three ("1,000", "1,\!000", "1{,}000");
    "1,2" is a list, not 12; "1 000" is not read (write `1\,000`); numbers
    over 64 characters or with an exponent over 64 are not read
    (rewards.parse_number), so "1e999999" never expands;
  - grammar: + - (unary too), `*` `\cdot` `\times` `/` `\div`, `^` with an
    integer exponent |e| <= 64 (a braced group or one digit), ( ) { },
    `\frac{a}{b}` and the shorthand `\frac12`, `\sqrt{x}` / `\sqrt2` of a
    non-negative rational; implicit products only before `\sqrt`
    ("2\sqrt{2}"): "2\frac12" is NOT a mixed number (it is not read);
  - values are exact: a sum of rational multiples of square roots of
    square-free integers, canonical (sqrt 8 -> 2 sqrt 2, 1/sqrt 2 ->
    sqrt 2 / 2), so equality is exact, no floats: "1.414" != "\sqrt2",
    "0.333" != "1/3"; division is only by one term ("1/(1+\sqrt2)" is not
    read); sizes are capped (4096-bit numerators, 16 terms, radicands <=
    1e12, 32 levels of nesting, 512 characters), beyond which the text is
    not read, so nothing can hang;
  - when either side is not a value (an interval, `\pi/2`, a word, "2x"), the
    two normalised strings are compared (spaces dropped except between two
    letters or digits): equal strings score 1.0, else 0.0.
The reference scores None only when nothing is left of it after
normalisation. `answer_key(name, text)` gives the canonical form a verifier
compares (for majority voting, evaluation.majority_vote).

User reward functions: `load_reward_fn("pkg.module:fn")` imports one by
path; `call_with_timeout(fn, completion, answer, timeout_s)` calls it in a
thread and returns (score or None, error text or None), so an exception, a
bad return value or a hang scores None and is reported, never stops a run.
"""

from __future__ import annotations

import importlib
import math as _math
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, Hashable

from deepseek_jax.rl.rewards import parse_number

Verifier = Callable[[str, str], "float | None"]

# ---------------------------------------------------------------- final answer

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\{")
_BRACE = re.compile(r"\\[{}]|[{}]")


def _last_box(text: str) -> str | None:
  """Content of the last-opened \\boxed{...} that closes (one pass, O(len))."""
  box_starts = {m.end() for m in _BOX_OPEN.finditer(text)}
  if not box_starts:
    return None
  stack: list[int] = []
  best: tuple[int, int] | None = None
  for m in _BRACE.finditer(text, min(box_starts) - 1):
    c = m.group()
    if c == "{":
      stack.append(m.end())
    elif c == "}" and stack:                          # (\{ and \} are escaped, not braces)
      start = stack.pop()
      if start in box_starts and (best is None or start > best[0]):
        best = (start, m.start())
  return None if best is None else text[best[0]:best[1]]


def _last_answer_block(text: str) -> str | None:
  end = text.rfind("</answer>")
  start = text.rfind("<answer>", 0, max(end, 0))
  return None if end < 0 or start < 0 else text[start + len("<answer>"):end]


def extract_answer(text: str) -> str | None:
  """The stripped final answer of a completion (the module docstring's rule), or None."""
  tail_start = text.rfind("</think>")
  parts = ([text[tail_start + len("</think>"):]] if tail_start >= 0 else []) + [text]
  for part in parts:
    for found in (_last_box(part), _last_answer_block(part)):
      if found is not None:
        return found.strip()
  return None


# ---------------------------------------------------------------- normalisation

_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox)"
                       r"\s*\{([^{}]*)\}")
_REMOVE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\$", "$",
           "\\(", "\\)", "\\[", "\\]", "^{\\circ}", "^\\circ", "\\circ", "\\degree", "°",
           "\\%", "%")
_RENAME = (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("~", " "),
           ("\\ ", " "))
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_NAME_IS = re.compile(r"\\?[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*")
_UNIT_WORD = re.compile(r"[A-Za-z]+\.?|[A-Za-z]*\^\{?[0-9]\}?\.?")
_GLUED_UNIT = re.compile(r"(?<=[0-9])(?:cm|mm|km|m|kg|mg|g|ml|s|min|h|ft|in|lb|oz)"
                         r"(?:\^\{?[0-9]\}?)?$")
_MAX_ANSWER_CHARS = 2000       # longer answers are only whitespace-collapsed


def _normalise(text: str) -> str:
  """The math rules' normalised text of one answer (module docstring)."""
  s = text.strip()
  if len(s) > _MAX_ANSWER_CHARS:
    return " ".join(s.split())
  s = _WRAPPERS.sub(lambda m: f" {m.group(1)} ", s)
  for old, new in _RENAME:
    s = s.replace(old, new)
  for old in _REMOVE:
    s = s.replace(old, "")
  s = " ".join(s.split())
  if (lead := _ANSWER_IS.match(s)) and s[lead.end():]:
    s = s[lead.end():]
  if (lead := _NAME_IS.match(s)) and s[lead.end():]:
    s = s[lead.end():]
  words = s.split(" ")
  j = len(words)
  while j > 1 and _UNIT_WORD.fullmatch(words[j - 1]):
    j -= 1
  if j < len(words) and words[j - 1][-1:] in tuple("0123456789})"):
    s = " ".join(words[:j])
  s = _GLUED_UNIT.sub("", s).rstrip(". ")
  return s


def _compact(s: str) -> str:
  """Spaces dropped except between two letters or digits."""
  return re.sub(r"\s*([^\w\s])\s*", r"\1", s)


# ---------------------------------------------------------------- exact values

class _NotAValue(Exception):
  """The text is not a value this grammar reads (or it is too large)."""


_Value = dict          # {square-free radicand r: nonzero Fraction q}: sum of q * sqrt(r)
_MAX_BITS, _MAX_TERMS, _MAX_RADICAND, _MAX_EXPONENT = 4096, 16, 10**12, 64
_MAX_DEPTH, _MAX_VALUE_CHARS = 32, 512


def _checked(v: _Value) -> _Value:
  if len(v) > _MAX_TERMS:
    raise _NotAValue
  for r, q in v.items():
    if (r > _MAX_RADICAND or q.numerator.bit_length() > _MAX_BITS
        or q.denominator.bit_length() > _MAX_BITS):
      raise _NotAValue
  return v


def _const(q: Fraction) -> _Value:
  return {1: Fraction(q)} if q else {}


def _add(a: _Value, b: _Value, sign: int = 1) -> _Value:
  out = dict(a)
  for r, q in b.items():
    s = out.get(r, 0) + sign * q
    if s:
      out[r] = s
    else:
      out.pop(r, None)
  return _checked(out)


def _mul(a: _Value, b: _Value) -> _Value:
  """sqrt(r1) sqrt(r2) = g sqrt(r1 r2 / g^2), g = gcd: square-free when r1, r2 are."""
  out: _Value = {}
  for r1, q1 in a.items():
    for r2, q2 in b.items():
      g = _math.gcd(r1, r2)
      out = _add(out, {(r1 // g) * (r2 // g): q1 * q2 * g})
  return _checked(out)


def _inverse(v: _Value) -> _Value:
  """1 / (q sqrt r) = sqrt(r) / (q r); only one term is inverted."""
  if len(v) != 1:
    raise _NotAValue
  (r, q), = v.items()
  return _checked({r: 1 / (q * r)})


def _squarefree(m: int) -> tuple[int, int]:
  """(s, f) with m = s^2 f, f square-free, for 0 < m <= 1e12 (trial division to 1e4:
  what is left has at most two prime factors, all above 1e4)."""
  s = f = 1
  p = 2
  while p <= 10_000 and p * p <= m:
    e = 0
    while m % p == 0:
      m //= p
      e += 1
    s, f, p = s * p ** (e // 2), f * p ** (e % 2), p + 1
  root = _math.isqrt(m)
  return (s * root, f) if root * root == m else (s, f * m)


def _sqrt(v: _Value) -> _Value:
  if not v:
    return {}
  if set(v) != {1} or v[1] < 0:
    raise _NotAValue                                  # a square root of a root or a negative
  n, d = v[1].numerator, v[1].denominator
  if n * d > _MAX_RADICAND:
    raise _NotAValue
  s, f = _squarefree(n * d)                           # sqrt(n / d) = sqrt(n d) / d
  return _checked({f: Fraction(s, d)})


def _power(v: _Value, e: _Value) -> _Value:
  if e and (set(e) != {1} or e[1].denominator != 1):
    raise _NotAValue                                  # only integer exponents
  k = int(e[1]) if e else 0
  if abs(k) > _MAX_EXPONENT or (k <= 0 and not v):
    raise _NotAValue
  base, out = (_inverse(v) if k < 0 else v), {1: Fraction(1)}
  for _ in range(abs(k)):                             # <= 64 checked products
    out = _mul(out, base)
  return out


_NUM = re.compile(r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?"
                  r"|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class _Parser:
  """Recursive descent over the grammar in the module docstring."""

  def __init__(self, s: str):
    self.s, self.i, self.depth = s, 0, 0

  def peek(self, token: str) -> bool:
    while self.s.startswith(" ", self.i):
      self.i += 1
    return self.s.startswith(token, self.i)

  def take(self, token: str) -> bool:
    if self.peek(token):
      self.i += len(token)
      return True
    return False

  def expect(self, token: str) -> None:
    if not self.take(token):
      raise _NotAValue

  def value(self) -> _Value:
    v = self.sum()
    if self.peek("") and self.i != len(self.s):
      raise _NotAValue                                # text left over: "2\frac12", "1,2"
    return v

  def sum(self) -> _Value:
    self.depth += 1
    if self.depth > _MAX_DEPTH:
      raise _NotAValue
    v = self.product()
    while True:
      if self.take("+"):
        v = _add(v, self.product())
      elif self.take("-"):
        v = _add(v, self.product(), -1)
      else:
        self.depth -= 1
        return v

  def product(self) -> _Value:
    v = self.unary()
    while True:
      if self.take("*") or self.take("\\cdot") or self.take("\\times"):
        v = _mul(v, self.unary())
      elif self.take("/") or self.take("\\div"):
        v = _mul(v, _inverse(self.unary()))
      elif self.peek("\\sqrt"):
        v = _mul(v, self.unary())
      else:
        return v

  def unary(self) -> _Value:
    sign = 1
    while self.peek("-") or self.peek("+"):
      if self.take("-"):
        sign = -sign
      else:
        self.take("+")
    v = self.atom()
    if self.take("^"):
      v = _power(v, self.argument())
    return _mul({1: Fraction(sign)}, v)

  def argument(self) -> _Value:
    """A braced group or a single digit (\\frac12, \\sqrt2, x^2)."""
    if self.take("{"):
      v = self.sum()
      self.expect("}")
      return v
    c = self.s[self.i:self.i + 1]
    if c and c in "0123456789":
      self.i += 1
      return _const(Fraction(int(c)))
    raise _NotAValue

  def atom(self) -> _Value:
    for left, right in (("(", ")"), ("{", "}")):
      if self.take(left):
        v = self.sum()
        self.expect(right)
        return v
    if self.take("\\frac"):
      a = self.argument()
      return _mul(a, _inverse(self.argument()))
    if self.take("\\sqrt"):
      if self.peek("["):
        raise _NotAValue                              # n-th roots are not read
      return _sqrt(self.argument())
    m = _NUM.match(self.s, self.i)
    q = parse_number(m.group()) if m else None
    if q is None:
      raise _NotAValue
    self.i = m.end()
    return _const(q)


def _value(s: str) -> _Value | None:
  if len(s) > _MAX_VALUE_CHARS:
    return None
  try:
    return _Parser(s).value()
  except (_NotAValue, ZeroDivisionError, RecursionError):
    return None


def _math_key(text: str) -> Hashable | None:
  """("value", canonical terms) when `text` reads as a value, else ("text", compact
  normalised string); None when nothing is left."""
  s = _normalise(text)
  if not s or len(s) > _MAX_ANSWER_CHARS:
    return ("text", s) if s else None
  v = _value(s)
  return ("text", _compact(s)) if v is None else ("value", frozenset(v.items()))


# ---------------------------------------------------------------- verifiers

def math(completion_text: str, answer: str) -> float | None:
  """1.0 when the final answer equals `answer` by value (module docstring), 0.0
  when it differs or is missing, None when `answer` is empty after normalisation."""
  ref = str(answer)
  boxed = _last_box(ref)
  want = _math_key(ref if boxed is None else boxed)
  if want is None:
    return None
  got_text = extract_answer(completion_text)
  return 0.0 if got_text is None else float(_math_key(got_text) == want)


_CHOICE = re.compile(
    r"\(([A-Ea-e])\)"                                   # (B)
    r"|(?<![A-Za-z0-9\\])([A-E])\)"                     # B)
    r"|(?m:^)[ \t*]*([A-E])[.:](?=\s|$)"                # B. text   (at a line start)
    r"|(?i:answer)(?:\s+(?i:is))?\s*[:=]?[\s*(]*"       # the answer is B / Answer: (b)
    r"(?:([A-E])(?![A-Za-z0-9])|([a-e])(?=[\s*).,;:!]*$|[*).,;:!]))"
    r"|(?i:option|choice)\s+\(?([A-E])(?![A-Za-z0-9])")  # option C
_LONE_LETTER = re.compile(r"[\s(*{]*([A-Ea-e])[\s)*}.:]*")


def _letter(region: str) -> str | None:
  """The last letter A-E stated in `region`, upper case, or None."""
  region = _WRAPPERS.sub(lambda m: f" {m.group(1)} ", region)
  lone = _LONE_LETTER.fullmatch(region.replace("$", ""))
  if lone:
    return lone.group(1).upper()
  letters = [next(g for g in m.groups() if g) for m in _CHOICE.finditer(region)]
  return letters[-1].upper() if letters else None


def choice(completion_text: str, answer: str) -> float | None:
  """1.0 when the last letter A-E the completion states (in its final answer when
  it has one, else anywhere) is `answer`'s letter; None when `answer` has none."""
  want = _letter(str(answer))
  if want is None:
    return None
  region = extract_answer(completion_text)
  got = _letter(completion_text if region is None else region)
  return float(got == want)


def _collapsed(completion_text: str) -> str:
  found = extract_answer(completion_text)
  return " ".join((completion_text if found is None else found).split())


def exact(completion_text: str, answer: str) -> float | None:
  """1.0 when the final answer (the whole text without one), stripped and with
  whitespace collapsed, equals `answer` likewise; None for an empty `answer`."""
  want = " ".join(str(answer).split())
  return None if not want else float(_collapsed(completion_text) == want)


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern | None:
  try:
    return re.compile(pattern)
  except re.error:
    return None


def regex(completion_text: str, answer: str) -> float | None:
  """1.0 when the regular expression `answer` fullmatches the final answer (the
  whole text without one), stripped and collapsed; None when it does not compile.
  A user pattern can backtrack for ever: run untrusted ones with call_with_timeout."""
  pattern = _compiled(str(answer))
  return None if pattern is None else float(pattern.fullmatch(_collapsed(completion_text))
                                            is not None)


VERIFIERS: dict[str, Verifier] = {"math": math, "choice": choice, "exact": exact,
                                  "regex": regex}
_KEYS: dict[str, Callable[[str], Hashable]] = {
    "math": lambda t: None if (a := extract_answer(t)) is None else _math_key(a),
    "choice": lambda t: _letter(t if (a := extract_answer(t)) is None else a),
    "exact": lambda t: _collapsed(t) or None,
    "regex": lambda t: _collapsed(t) or None}


def get(name: str) -> Verifier:
  """The verifier called `name`; ValueError naming the known ones otherwise."""
  try:
    return VERIFIERS[name]
  except KeyError:
    raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}"
                     ) from None


def answer_key(name: str, completion_text: str) -> Hashable | None:
  """The canonical form of a completion's answer that verifier `name` compares
  (math: its exact value or normalised text; choice: the letter; exact / regex:
  the collapsed final answer), None without one: majority voting groups equal keys."""
  get(name)
  return _KEYS[name](completion_text)


# ---------------------------------------------------------------- user functions

def load_reward_fn(path: str) -> Callable[..., Any]:
  """The callable at import path "package.module:function" (the attribute may be
  dotted, "module:Class.method"); ValueError naming the path when the module
  cannot be imported, the attribute is missing or it is not callable."""
  module_name, sep, attr = str(path).partition(":")
  if not sep or not module_name.strip() or not attr.strip():
    raise ValueError(f"reward function {path!r}: write it as 'package.module:function'.")
  try:
    obj: Any = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"reward function {path!r}: cannot import module {module_name!r} "
                     f"({type(e).__name__}: {e}).") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"reward function {path!r}: module {module_name!r} has no "
                       f"attribute {attr!r}.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f"reward function {path!r} is a {type(obj).__name__}, not callable.")
  return obj


def _as_score(value: Any) -> tuple[float | None, str | None]:
  if value is None:
    return None, None                                 # the function's own "cannot score"
  if isinstance(value, (str, bytes)):
    return None, f"TypeError: returned {type(value).__name__} {value!r:.80}, not a number"
  try:
    score = float(value)
  except (TypeError, ValueError):
    return None, f"TypeError: returned {type(value).__name__} {value!r:.80}, not a number"
  if not _math.isfinite(score):
    return None, f"ValueError: returned {score}"
  return score, None


def call_with_timeout(fn: Callable[..., Any], completion: str, answer: Any,
                      timeout_s: float | None) -> tuple[float | None, str | None]:
  """(score, None) from fn(completion, answer), or (None, error text).

  The error text starts with the exception's type name ("ZeroDivisionError:
  ..."), with "TimeoutError:" when no result came within timeout_s seconds,
  or "TypeError:" / "ValueError:" for a return value that is not a finite
  number; a function returning None scores (None, None). The call runs in a
  daemon thread that is abandoned at the timeout: Python cannot kill a thread,
  so a hung function keeps its thread (and any CPU it spins) until it returns
  or the process exits. timeout_s=None calls fn inline, without a timeout.
  """
  if timeout_s is not None and not timeout_s > 0:
    raise ValueError(f"timeout_s={timeout_s} must be positive (or None for no timeout).")
  out: dict[str, Any] = {}

  def target() -> None:
    try:
      out["value"] = fn(completion, answer)
    except Exception as e:  # noqa: BLE001 (any user function may fail; the run goes on)
      out["error"] = f"{type(e).__name__}: {e}"

  if timeout_s is None:
    target()
  else:
    worker = threading.Thread(target=target, daemon=True,
                              name=f"reward-{getattr(fn, '__name__', 'fn')}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
      return None, f"TimeoutError: no result within {timeout_s:g} s"
  if "error" in out:
    return None, out["error"]
  if "value" not in out:                              # SystemExit & co. ended the thread
    return None, "SystemExit: the function exited without a result"
  return _as_score(out.get("value"))
