"""Rule rewards of the R1-style math task (accuracy through math-verify, format, tags,
reasoning shape, length, rigor) and the worker process that bounds math-verify's time.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import signal
import threading
from typing import Any, Callable

from math_verify import parse, verify

from grailcore.data.schema import Example
from grailcore.rewards.parsing import MATH_TAGS, extract_answer, math_format_ok
from grailcore.rewards.registry import register

DEFAULT_MATH_REWARDS: tuple[tuple[str, ...], tuple[float, ...]] = (
    ("math_accuracy", "math_format", "reasoning_steps", "math_tag_count", "length", "mathematical_rigor"),
    (4.0, 1.0, 2.0, 1.0, 0.8, 1.5),
)
"""(names, weights) of the R1 recipe: `RewardsConfig(names=..., weights=...)`."""


class VerifyTimeout(TimeoutError):
    """A math-verify call ran past its hard limit; its worker was killed."""


def _serve(conn: Any) -> None:
    """Worker loop: run each (fn, args) received and send back ("ok"|"error", value)."""
    # Ctrl-C reaches the whole process group; the parent decides, the worker must not
    # die mid-reply and print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the parent closed the pipe: shut down
            return
        try:
            conn.send(("ok", fn(*args)))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", f"{type(error).__name__}: {error}"))


class VerifyWorker:
    """One process that runs verification calls under a hard per-call time limit.

    math-verify's own timeout uses SIGALRM, which works only in the main thread; a
    process can be killed from any thread. On timeout the process is killed and the
    next call starts a fresh one. Calls are serialised (a lock): one worker, one call.
    """

    def __init__(self, start_timeout_s: float = 120.0):
        self.start_timeout_s = start_timeout_s
        """Budget for a fresh worker to import math-verify; not part of any call's limit."""
        self._process: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        # spawn, not fork: forking a trainer that holds threads (torch, engines) can
        # deadlock the child on a lock some thread held at fork time.
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(target=_serve, args=(child_conn,), name="grailcore-math-verify", daemon=True)
        process.start()
        child_conn.close()  # only the child holds its end: EOF here if it dies
        self._process, self._conn = process, parent_conn
        try:
            started = parent_conn.poll(self.start_timeout_s) and parent_conn.recv() == "ready"
        except EOFError:  # it died while importing; its traceback went to stderr
            started = False
        if not started:
            exitcode = process.exitcode
            self.close()
            raise RuntimeError(f"math-verify worker did not start within {self.start_timeout_s} s "
                               f"(exit code {exitcode}; its stderr says why)")

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        """`fn(*args)` in the worker; VerifyTimeout after `timeout_s` seconds."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self.close()
                self._start()
            try:
                self._conn.send((fn, args))
                finished = self._conn.poll(timeout_s)
                status, value = self._conn.recv() if finished else (None, None)
            except (EOFError, OSError) as error:
                self.close()
                raise RuntimeError(f"math-verify worker died ({error!r}); the next call starts a new one") from error
            if not finished:
                self.close()
                raise VerifyTimeout(f"math-verify call exceeded {timeout_s} s; worker killed and replaced")
        if status == "error":
            raise RuntimeError(f"math-verify worker: {value}")
        return value

    def close(self) -> None:
        """Kill the worker process, if any."""
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()
        self._process, self._conn = None, None


_DEFAULT_WORKER = VerifyWorker()


def _parse_math(answer: str) -> list:
    # Read as free text, a bare answer ("x^2+1", "(1, 2)") loses to math-verify's
    # last-number heuristics; read it as one LaTeX formula unless it is delimited.
    if any(marker in answer for marker in ("$", "\\boxed", "\\(", "\\[")):
        return parse(answer, parsing_timeout=None)
    # parsing_timeout=None: the worker's hard limit bounds the whole call instead.
    return parse(f"${answer}$", parsing_timeout=None) or parse(answer, parsing_timeout=None)


def answers_equivalent(gold: str, predicted: str) -> bool:
    """math-verify equivalence (\\frac{1}{2} == 0.5, x=2 == 2). Unbounded: run it in a worker."""
    gold_parsed = _parse_math(gold)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    return bool(verify(gold_parsed, _parse_math(predicted), timeout_seconds=None))


@register("math_accuracy", task="math")
def math_accuracy(
    example: Example,
    completion: str,
    *,
    math_verify_timeout_s: float = 5.0,
    check: Callable[[str, str], bool] = answers_equivalent,
    worker: VerifyWorker | None = None,
) -> float:
    """1 when the <answer> content is equivalent to the gold answer.

    `check(gold, predicted)` runs in `worker` (the shared one by default) and raises
    VerifyTimeout past `math_verify_timeout_s`; it must be picklable (module level).
    """
    if not example.answer:
        raise ValueError(f"example {example.example_id!r}: math_accuracy needs a gold 'answer'")
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    worker = worker or _DEFAULT_WORKER
    return float(worker.run(check, (example.answer, predicted), timeout_s=math_verify_timeout_s))


@register("math_format", task="math")
def math_format(example: Example, completion: str) -> float:
    """1 for the exact layout `<think>..</think><answer>..</answer>`."""
    return float(math_format_ok(completion))


_MATH_TAG_STRINGS = tuple(s for tag in MATH_TAGS for s in (f"<{tag}>", f"</{tag}>"))


@register("math_tag_count", task="math")
def math_tag_count(example: Example, completion: str) -> float:
    """1/4 for each of the four tag strings that occurs exactly once."""
    return sum(completion.count(s) == 1 for s in _MATH_TAG_STRINGS) / len(_MATH_TAG_STRINGS)


_STEP_MARKERS = re.compile(
    r"\bstep\s*\d+"  # "Step 1:", "step 2"
    r"|^[ \t]*\d+[.)][ \t]"  # numbered list line
    r"|^[ \t]*[-*\u2022][ \t]"  # bullet line
    r"|\b(?:first|second|third|next|then|after that|finally)\b"
    r"|首先|其次|然后|接着|最后|第[一二三四五六七八九十0-9]+步",
    re.IGNORECASE | re.MULTILINE,
)
STEPS_FOR_FULL_REWARD = 3


@register("reasoning_steps")
def reasoning_steps(example: Example, completion: str) -> float:
    """min(1, markers / 3): step markers ("Step 1", numbered or bulleted lines, "First,",
    "Then", "Finally", Chinese 首先/然后/最后, ...) anywhere in the completion."""
    return min(1.0, len(_STEP_MARKERS.findall(completion)) / STEPS_FOR_FULL_REWARD)


LENGTH_SIGMA_FRACTION = 0.5
"""Width of the length gaussian, as a fraction of the target."""


@register("length")
def length(example: Example, completion: str, *, length_target: int = 200) -> float:
    """exp(-(words - target)^2 / (2 sigma^2)), sigma = target / 2: 1 at the target,
    0.61 at half or 1.5x of it, 0.14 at 0 or 2x. Words split on whitespace."""
    if length_target <= 0:
        raise ValueError(f"rewards.length_target must be > 0, got {length_target}")
    sigma = LENGTH_SIGMA_FRACTION * length_target
    return math.exp(-0.5 * ((len(completion.split()) - length_target) / sigma) ** 2)


_RIGOR_SIGNALS: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"(?<![=<>!])=(?!=)"), 2),  # equations written out
    (re.compile(r"\b(?:because|since|therefore|thus|hence|implies|it follows|we get|we have)\b"
                r"|⇒|\\implies|\\therefore", re.IGNORECASE), 2),  # justification
    (re.compile(r"\\[a-zA-Z]+|\d\s*[-+*/×÷^]\s*\d"), 3),  # notation and arithmetic
    (re.compile(r"\b(?:check|verif|substitut|plug)\w*", re.IGNORECASE), 1),  # checking
)


@register("mathematical_rigor", task="math")
def mathematical_rigor(example: Example, completion: str) -> float:
    """Mean over four signals, each min(1, hits / needed): equations (2 `=`),
    justification words (2), notation/arithmetic (3), a verification step (1)."""
    parts = [min(1.0, len(pattern.findall(completion)) / needed) for pattern, needed in _RIGOR_SIGNALS]
    return sum(parts) / len(parts)
