"""RULER-style synthetic tasks, generated locally and deterministically (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?").

Implemented from the paper's description of its task categories (nothing copied):

- needle in a haystack (`niah-single`, `niah-multikey`, `niah-multivalue`, `niah-multiquery`):
  "the special magic number for <key> is <value>" sentences hidden in filler. Multi-key adds
  needles for other keys (distractors); multi-value hides several values for one key, all to
  be returned; multi-query asks for the values of several keys at once;
- `variable-tracking`: a chain of assignments (VAR A = 12345, VAR B = VAR A, …) hidden in
  filler; every name that ends up holding the value is to be returned;
- `common-words`: a numbered list where a few words appear many times and many words a few
  times; the most common ones are to be returned;
- `frequent-words`: coded (made-up) words whose counts follow a Zeta (Zipf) law with
  exponent 2; the three most frequent are to be returned;
- `passkey`: the passkey test (Mohtashami & Jaggi 2023, "Landmark Attention") as a
  single-needle task with the classic filler.

Scoring is RULER's string match: `all` (the fraction of the expected strings found in the
prediction, case-insensitive) for every task here; `part` (1 when any is found) is kept for
tasks with alternative answers. A sample is the whole prompt, its expected answers, its
token count and every choice that made it (seed, depth, chat template), so a record alone
says how it was made. Prompts are fitted to a tokenizer's count: the longest prompt of at
most `length` tokens. `chat_template`: `auto` uses the tokenizer's template when it has one,
`on` requires it, `off` (the default, as lm-evaluation-harness without
`--apply_chat_template`) sends plain text; the choice actually used is in the sample.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
CHAT_TEMPLATES = ("auto", "on", "off")
# The tasks the default model scores above chance on, the default of `ropelab ruler --tasks`:
# the task screen of README "Evidence runs" (SmolLM2-135M, bfloat16, plain prompts, 1k tokens,
# depth 0.5, 10 samples per task, session 7). Chance there is the better of two guesses: one
# that never reads the context (about 0 for 7-digit numbers, random names and coined words)
# and one that copies candidates of the answer's kind from the context at random (needle
# values, listed words), where the context offers more candidates than the answer holds.
# Left out: niah-multikey (0.50 [0.24, 0.76] against 0.25 for copying one of the 4 values),
# common-words (0.21 [0.12, 0.30] against 0.28 for 10 of its ~36 distinct words) and
# variable-tracking (0.06 [0.00, 0.18]). passkey scores as niah-single and is left out as its twin.
CPU_TASKS = ("niah-single", "niah-multivalue", "niah-multiquery", "frequent-words")
METRICS = ("all", "part")

# Keys for needles: common English words, written for this module.
_WORDS = (
    "apple river candle garden mirror pocket ladder window meadow harbor silver forest planet violin "
    "anchor basket castle dragon engine feather glacier hammer island jacket kettle lantern marble "
    "needle orange pepper quartz rabbit saddle tablet umbrella velvet wagon yellow zebra bridge cactus "
    "dolphin falcon guitar helmet igloo jungle koala lemon magnet nectar oyster parrot quiver rocket "
    "spider tunnel valley walrus canyon copper crystal desert ember fossil galaxy hazel iris jasmine"
).split()
_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


def coded_word(rng: random.Random, syllables: int = 3) -> str:
    """A made-up pronounceable word (consonant-vowel syllables), as RULER's coded words."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _distinct_words(rng: random.Random, count: int, syllables: int = 3) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(coded_word(rng, syllables))
    return list(seen)


@dataclass(frozen=True)
class Parts:
    """What a task builds for a given amount of filler: the context, the question, the answers."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable[[str, int, float], Parts]  # (seed text, filler units, depth) -> Parts
    max_new_tokens: int  # enough for every expected string
    metric: str = "all"
    uses_depth: bool = True


def _place(units: list[str], inserts: list[tuple[float, str]]) -> str:
    """Filler units with each insert after round(depth * len(units)) units (ties keep their order)."""
    n = len(units)
    slots: dict[int, list[str]] = {}
    for depth, text in inserts:
        slots.setdefault(round(depth * n), []).append(text)
    out = []
    for i in range(n + 1):
        out.extend(slots.get(i, []))
        if i < n:
            out.append(units[i])
    return "".join(out)


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}. "


def _niah(keys: int = 1, values: int = 1, queries: int = 1):
    """A needle task: `keys` needles for different keys (the first `queries` asked), `values` values for each asked key."""

    def build(seed: str, units: int, depth: float) -> Parts:
        rng = random.Random(seed)
        names = rng.sample(_WORDS, max(keys, queries))
        table = {k: [str(rng.randint(1_000_000, 9_999_999)) for _ in range(values if i < queries else 1)]
                 for i, k in enumerate(names)}
        asked = names[:queries]
        inserts = [(depth, _needle(asked[0], table[asked[0]][0]))]  # the first asked needle sits at `depth`
        for k in names:
            for j, v in enumerate(table[k]):
                if (k, j) != (asked[0], 0):
                    inserts.append((rng.random(), _needle(k, v)))
        answers = [v for k in asked for v in table[k]]
        what = ", ".join(asked[:-1]) + (" and " if len(asked) > 1 else "") + asked[-1]
        plural = "numbers" if len(answers) > 1 else "number"
        question = (f"What {'are all' if len(answers) > 1 else 'is'} the special magic {plural} for {what} "
                    "mentioned in the text above?")
        return Parts(_place([FILLER] * units, inserts), question,
                     f"The special magic {plural} for {what} mentioned in the text above {'are' if len(answers) > 1 else 'is'}",
                     answers)

    return build


def _passkey(seed: str, units: int, depth: float) -> Parts:
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the important information there.\n\n")
    return Parts(intro + _place([FILLER] * units, [(depth, needle)]), "What is the pass key?", "The pass key is", [key])


def _variable_tracking(hops: int = 4):
    def build(seed: str, units: int, depth: float) -> Parts:
        rng = random.Random(seed)
        value = str(rng.randint(10000, 99999))
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, hops + 1)]
        later = sorted(depth + (1 - depth) * rng.random() for _ in range(hops))  # the chain keeps its order
        inserts = list(zip([depth, *later], chain))
        question = f"Find all variables that are assigned the value {value} in the text above."
        return Parts(_place([FILLER] * units, inserts), question,
                     f"Answer: the variables assigned the value {value} are:", names)

    return build


def _common_words(common: int = 10, uncommon_repeats: int = 3):
    def build(seed: str, units: int, depth: float) -> Parts:
        rng = random.Random(seed)
        # common words repeat more as the list grows (RULER uses many repeats at long lengths),
        # never fewer than twice the uncommon words' count, so the answer is unambiguous
        repeats = min(30, max(2 * uncommon_repeats, units // 8))
        words = _distinct_words(rng, common + units)
        top, rest = words[:common], words[common:]
        entries = [w for w in top for _ in range(repeats)] + [w for w in rest for _ in range(uncommon_repeats)]
        rng.shuffle(entries)
        context = "Below is a numbered list of words.\n" + "".join(f"{i + 1}. {w}\n" for i, w in enumerate(entries))
        return Parts(context, f"What are the {common} most common words in the list above?",
                     f"Answer: the {common} words that appear most often in the list are:", top)

    return build


def _frequent_words(answers: int = 3, alpha: float = 2.0):
    def build(seed: str, units: int, depth: float) -> Parts:
        rng = random.Random(seed)
        total = 40 + 10 * units  # words in the text; counts below follow rank^-alpha
        vocabulary = _distinct_words(rng, max(answers + 1, units + 4), syllables=2)
        weights = [r ** -alpha for r in range(1, len(vocabulary) + 1)]
        scale = total / sum(weights)
        counts = [max(1, int(scale * w)) for w in weights]
        entries = [w for w, c in zip(vocabulary, counts) for _ in range(c)]
        rng.shuffle(entries)
        context = "Read the following coded text and track how often each coded word appears.\n" + " ".join(entries) + "\n"
        return Parts(context, f"What are the {answers} most frequently appearing coded words in the coded text above?",
                     f"Answer: the {answers} most frequent coded words are:", vocabulary[:answers])

    return build


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("niah-single", "one needle in filler; return its value", _niah(), 24),
        Task("niah-multikey", "one asked needle among needles for 3 other keys", _niah(keys=4), 24),
        Task("niah-multivalue", "4 values hidden for one key; return all", _niah(values=4), 64),
        Task("niah-multiquery", "needles for 4 keys; return the values of all 4", _niah(keys=4, queries=4), 64),
        Task("variable-tracking", "a 4-hop chain of assignments; return every name holding the value", _variable_tracking(), 32),
        Task("common-words", "return the 10 most common words of a list", _common_words(), 96, uses_depth=False),
        Task("frequent-words", "return the 3 most frequent coded words (Zeta law, exponent 2)", _frequent_words(), 32,
             uses_depth=False),
        Task("passkey", "the passkey test (Landmark Attention) as a single needle", _passkey, 12),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"task={name!r}: unknown task; {hint}available: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class Sample:
    """One generated prompt and everything needed to score and reproduce it."""

    task: str
    length: int  # requested tokens
    depth: float | None  # None for tasks without a needle position
    index: int
    seed: int
    prompt: str
    answers: list[str]
    tokens: int  # the prompt's token count (<= length)
    chat_template: bool  # whether the tokenizer's chat template was applied
    add_special_tokens: bool  # how the prompt must be tokenized (False when the template adds them)
    max_new_tokens: int
    metric: str
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def uses_template(tokenizer, chat_template: str) -> bool:
    """Whether `chat_template` (auto | on | off) applies the tokenizer's chat template; 'on' without one raises."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template={chat_template!r}: must be one of {', '.join(CHAT_TEMPLATES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "on" and not has:
        raise ValueError("chat_template='on': this tokenizer has no chat template; use 'auto' or 'off'")
    return has and chat_template != "off"


def render(tokenizer, parts: Parts, templated: bool) -> str:
    """The prompt text: context, question, then the answer prefix the model continues."""
    user = f"{parts.context}\n\n{parts.question}"
    if not templated:
        return f"{user}\n{parts.answer_prefix}"
    head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return head + parts.answer_prefix


def min_words(task: str, depth: float = 0.5, seed: int = 0) -> int:
    """Whitespace-separated words of `task`'s smallest plain prompt (its needles and question, no filler).

    A lower bound on its tokens for tokenizers that split on whitespace before merging (BPE
    as in GPT-2, Llama, SmolLM2): no token spans two words, and a chat template only adds.
    The CLI uses it to refuse a too-short length before the model loads.
    """
    parts = get_task(task).build(f"{task}:{seed}:bound", 0, float(depth))
    return len(f"{parts.context}\n\n{parts.question}\n{parts.answer_prefix}".split())


def count_tokens(tokenizer, text: str, add_special_tokens: bool) -> int:
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def make_sample(tokenizer, task: str, length: int, depth: float = 0.5, index: int = 0, seed: int = 0,
                chat_template: str = "off") -> Sample:
    """The longest prompt of `task` with at most `length` tokens; deterministic for (task, length, depth, index, seed)."""
    spec = get_task(task)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length={length!r}: must be a positive integer (tokens)")
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: must be between 0 and 1 (fraction of the context before the needle)")
    templated = uses_template(tokenizer, chat_template)
    special = not templated  # a chat template writes its own special tokens
    key = f"{task}:{seed}:{length}:{depth if spec.uses_depth else '-'}:{index}"

    def size(units: int) -> tuple[int, Parts, str]:
        parts = spec.build(key, units, float(depth))
        text = render(tokenizer, parts, templated)
        return count_tokens(tokenizer, text, special), parts, text

    smallest = size(0)
    if smallest[0] > length:
        raise ValueError(f"length={length}: task {task!r} needs at least {smallest[0]} tokens (its needles, question and smallest context)")
    hi = 1
    while size(hi)[0] <= length:  # grow until too long, then bisect: the token count grows with the units
        hi *= 2
    lo = hi // 2 if hi > 1 else 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid)[0] <= length else (lo, mid)
    tokens, parts, text = size(lo)
    return Sample(task, length, float(depth) if spec.uses_depth else None, index, seed, text, parts.answers, tokens,
                  templated, special, spec.max_new_tokens, spec.metric, {"filler_units": lo})


def make_samples(tokenizer, tasks, lengths, depths=(0.5,), samples: int = 1, seed: int = 0,
                 chat_template: str = "off") -> list[Sample]:
    """Every task × length × depth × index; depth-free tasks get one depth (None). All input checked first."""
    for t in tasks:
        get_task(t)
    for d in depths:
        if not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"depth={d!r}: must be between 0 and 1 (fraction of the context before the needle)")
    if samples < 1:
        raise ValueError(f"samples={samples}: must be at least 1")
    out = []
    for t in tasks:
        for n in lengths:
            for d in (depths if TASKS[t].uses_depth else depths[:1]):
                out.extend(make_sample(tokenizer, t, n, d, i, seed, chat_template) for i in range(samples))
    return out


def score(prediction: str, answers: list[str], metric: str = "all") -> float:
    """RULER's string match: `all` = fraction of answers found in the prediction; `part` = 1 if any is."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: must be one of {', '.join(METRICS)}")
    if not answers:
        raise ValueError("answers=[]: a sample needs at least one expected string")
    found = [a.lower() in prediction.lower() for a in answers]
    return sum(found) / len(found) if metric == "all" else float(any(found))
