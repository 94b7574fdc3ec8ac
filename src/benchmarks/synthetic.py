"""Synthetic needle-in-a-haystack benchmark (RULER-style tasks), built at an exact token length.

Every prompt is assembled from token-id pieces (chat-template head, haystack sentences, needles,
question + template tail + answer prefix), so ``len(sample.input_ids) == context_len`` exactly;
the filler is padded by whole sentences and the last sentence is cut at token level.

Tasks (``cfg.tasks``; ``None`` means ``["single_needle"]``):

* ``single_needle``: one "special magic number" (7 digits) for a key word; string match (100
  when the number appears in the answer, else 0).
* ``multi_key``: four needles with different key words, the question asks for one of them.
* ``multi_value``: four numbers for the same key word; score = % of them in the answer.
* ``variable_tracking``: ``VAR A = 12345``, ``VAR B = VAR A``, ... (four hops); the answer must
  list every variable holding the value; score = % of the names found.
* ``multi_question``: four needles with different key words in one context, and four samples
  that ask for each of them in turn (a random order): they share ``meta["context_id"]`` and carry
  ``meta["question_position"]`` (0-3), so that a compressed context serves every question
  (:mod:`atskv.experiments.protocol`); string match. ``n`` counts contexts, each giving four
  samples; the first question's prompt has exactly ``context_len`` tokens, the others differ by
  their question's length.

``cfg.haystack`` is ``"generated"`` (seeded pseudo-English, no external data) or a folder of
``.txt`` essays. Sample ``i`` of a task puts its target needle at depth ``i`` of an evenly spaced
grid over [0.05, 0.95]; ``meta`` holds ``depth``, ``depths``, ``needles``, ``needle_spans``
(``[start, end)`` token spans of each needle in ``input_ids``), ``answer_needles`` (indices into
``needle_spans`` of the needles holding the answer: the one needle, the target key's needle,
all four values, the whole variable chain) and ``answer_prefix``. No stop string (the scorer
looks for the answers anywhere in the generation).

Splits (``cfg.split``): ``dev`` and ``test`` draw from separate RNG namespaces
(``atskv-synthetic/<split>:<seed>:<task>:<i>``), separate key words (alternate entries of the
key lists) and separate haystacks: the generated filler of each split has its own vocabulary
(no content word in common), and a haystack folder's ``.txt`` files are divided by the SHA-1
of ``"atskv-split:" + file name`` (divisible by 3: dev, about a third; else test). Sample ids carry the split:
``synthetic/<split>/<task>/<context_len>/<seed>/<i>``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass
from typing import Any

from atskv.benchmarks.base import BENCHMARKS, Benchmark
from atskv.benchmarks.textmetrics import cfg_get, hash_split
from atskv.core.types import ConfigError, Sample

TASKS: dict[str, int] = {  # task name -> default max_new_tokens
    "single_needle": 16,
    "multi_key": 16,
    "multi_value": 48,
    "variable_tracking": 48,
    "multi_question": 16,
}
METRIC_NAMES: dict[str, str] = {  # task name -> what its score measures, for report tables
    "single_needle": "string match",  # the gold number appears in the answer: 0 or 100
    "multi_key": "string match",
    "multi_value": "recall of values",  # share of the four numbers that appear
    "variable_tracking": "recall of variables",  # share of the chain's names that appear
    "multi_question": "string match",
}
DEFAULT_TASKS = ["single_needle"]
DEFAULT_N = 8
MIN_FILLER_TOKENS = 64  # a prompt must hold at least this much haystack besides the needles
N_KEYS = 4  # multi_key: needles with different keys (1 target + 3 distractors)
N_VALUES = 4  # multi_value: values for the same key
N_HOPS = 4  # variable_tracking: assignments after the first (5 variables in all)

# Filler vocabulary per split: dev and test share no content word, and neither shares a word
# with the key words below, the instructions, the questions or the needles.
_FILLER: dict[str, dict[str, list[str]]] = {
    "test": {
        "adj": (
            "quiet bright ancient narrow gentle heavy hollow clever silent golden distant sunny "
            "humble steady curious patient broken crowded simple rustic tidy lofty wooden"
        ).split(),
        "noun": (
            "river garden village market teacher engine station lantern orchard bridge library "
            "traveler meadow kitchen painter forest castle window letter mountain sailor farmer "
            "workshop valley"
        ).split(),
        "verb": (
            "visited crossed painted watched followed repaired described admired opened "
            "measured carried noticed studied cleaned remembered"
        ).split(),
        "adv": (
            "slowly carefully often rarely happily quietly eagerly patiently suddenly gladly"
        ).split(),
        "name": "Alice Marco Priya Tomas Helen Omar Lena Victor Grace Samuel Nadia Felix".split(),
        "time": "morning evening spring winter afternoon autumn night summer".split(),
    },
    "dev": {
        "adj": (
            "bold crisp damp faint fragile gloomy grand hasty lively lonely modest mellow plain "
            "polite rough sleepy sturdy swift tender warm weary wild young"
        ).split(),
        "noun": (
            "barn cellar chapel cottage ferry fountain granary island ladder lighthouse mill "
            "pasture pier quarry reef school stable tavern tower vineyard wagon canal shepherd "
            "baker"
        ).split(),
        "verb": (
            "built guarded sketched polished explored mended praised climbed counted sold "
            "borrowed locked fixed greeted inspected"
        ).split(),
        "adv": "briskly calmly gently kindly boldly proudly softly warmly wisely loudly".split(),
        "name": "Bruno Clara Dmitri Elena Farid Ines Jonas Keiko Louis Mira Pablo Rosa".split(),
        "time": "dawn dusk noon midnight harvest holiday weekend twilight".split(),
    },
}
_KEY_ADJ = (
    "amber brave calm dusty eager fancy gusty hazy icy jolly keen lucky misty noble "
    "olive proud rapid shiny tame vivid witty zesty"
).split()
_KEY_NOUN = (
    "apple badger cactus dolphin falcon guitar harbor iris jacket kettle lemon magnet "
    "nectar otter pepper quilt rocket saddle tulip violin walnut zebra"
).split()
# Key words per split: alternate entries, so dev and test keys share no word.
_KEYS: dict[str, tuple[list[str], list[str]]] = {
    "test": (_KEY_ADJ[0::2], _KEY_NOUN[0::2]),
    "dev": (_KEY_ADJ[1::2], _KEY_NOUN[1::2]),
}
ESSAY_DEV_ONE_IN = 3  # a haystack file is dev when sha1("atskv-split:" + name) % 3 == 0


def filler_vocabulary(split: str) -> set[str]:
    """Every content word the generated haystack of ``split`` can use."""
    return {w for words in _FILLER[split].values() for w in words}


def key_words(split: str) -> set[str]:
    """Every word the keys of ``split``'s needles can use."""
    adjs, nouns = _KEYS[split]
    return set(adjs) | set(nouns)


_NIAH_HEAD = (
    "Some special magic numbers are hidden within the following text. Memorize them; "
    "you will be asked about them after the text."
)
_VT_HEAD = "Memorize and track the chain of variable assignments hidden in the following text."


def _filler_sentence(rng: random.Random, split: str) -> str:
    """One pseudo-English sentence (no digits) from a seeded generator, using only the content
    words of ``split``."""
    w = _FILLER[split]
    a, n, v, d = (rng.choice(w[k]) for k in ("adj", "noun", "verb", "adv"))
    n2, who, t = rng.choice(w["noun"]), rng.choice(w["name"]), rng.choice(w["time"])
    a2 = rng.choice(w["adj"])
    forms = (
        f"The {a} {n} {v} the {a2} {n2} {d}.",
        f"In the {t}, {who} {v} the {n} near the {n2}.",
        f"{who} said that the {n} was {a} and {a2}.",
        f"Nobody {v} the {a} {n} before the {t} came.",
        f"Every {t} the {n} {v} the {a} {n2}, and {who} {v} it {d}.",
        f"Why would anyone call the {n} {a}?",
        f"{who} {d} {v} the {n}, then went back to the {n2}.",
        f"It was a {a} {t}, and the {n} seemed {a2}.",
    )
    return rng.choice(forms)


@dataclass
class _Spec:
    """The content of one sample before the haystack is laid out."""

    head: str
    needles: list[str]
    question: str
    answer_prefix: str
    references: list[str]
    target: int  # index of the needle placed at the grid depth
    ordered: bool  # needles must appear in list order
    answer_needles: list[int]  # indices of the needles that hold the answer


def _make_spec(task: str, rng: random.Random, split: str) -> _Spec:
    """Keys, numbers, needles, question and answer prefix of one sample of ``task``, keys
    drawn from ``split``'s key words."""
    adjs, nouns = _KEYS[split]
    keys = rng.sample([f"{a}-{b}" for a in adjs for b in nouns], N_KEYS)
    nums = [str(x) for x in rng.sample(range(1_000_000, 10_000_000), max(N_KEYS, N_VALUES))]
    needle = "One of the special magic numbers for {} is: {}."
    if task in ("single_needle", "multi_key", "multi_question"):
        k = 1 if task == "single_needle" else N_KEYS
        t = rng.randrange(k)
        return _Spec(
            _NIAH_HEAD,
            [needle.format(keys[j], nums[j]) for j in range(k)],
            f"What is the special magic number for {keys[t]} mentioned in the provided text?",
            f"The special magic number for {keys[t]} mentioned in the provided text is",
            [nums[t]],
            t,
            False,
            [t],
        )
    if task == "multi_value":
        vals = nums[:N_VALUES]
        return _Spec(
            _NIAH_HEAD,
            [needle.format(keys[0], v) for v in vals],
            f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?",
            f"The special magic numbers for {keys[0]} mentioned in the provided text are",
            vals,
            0,
            False,
            list(range(N_VALUES)),
        )
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < N_HOPS + 1:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[j]} = VAR {names[j - 1]}." for j in range(1, len(names))]
    return _Spec(
        _VT_HEAD,
        chain,
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: The variables assigned the value {value} are:",
        names,
        0,
        True,
        list(range(len(chain))),
    )


def ask_for(spec: _Spec, j: int) -> _Spec:
    """``spec`` (a multi-key context) asking for needle ``j``'s number."""
    key = spec.needles[j].split(" for ", 1)[1].split(" is: ", 1)[0]
    number = spec.needles[j].rsplit(" ", 1)[1].rstrip(".")
    return dataclasses.replace(
        spec,
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        references=[number], target=j, answer_needles=[j])


def essay_files(folder: str, split: str) -> list[str]:
    """The names of ``folder``'s ``.txt`` files that belong to ``split`` (sorted): dev when the
    SHA-1 of ``"atskv-split:" + name``, as an integer, is divisible by 3, test otherwise."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".txt"))
    return [n for n in names if hash_split(n, ESSAY_DEV_ONE_IN) == split]


def _read_essays(folder: str, names: list[str]) -> list[str]:
    """Sentences of the files ``names`` in ``folder`` (in that order, whitespace normalised)."""
    sentences: list[str] = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read().split())
        parts = re.split(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])", text)
        sentences += [p for p in parts if p.strip()]
    return sentences


@BENCHMARKS.register("synthetic")
class SyntheticBenchmark(Benchmark):
    """Needle-in-a-haystack tasks at an exact prompt length; see the module docstring."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._essays: list[str] | None = None
        self._essay_tok: Any = None  # the tokenizer ``_essay_ids`` was built with
        self._essay_ids: list[list[int]] = []

    def tasks(self) -> list[str]:
        """The configured task names (``cfg.tasks``, default ``["single_needle"]``)."""
        tasks = cfg_get(self.cfg, "tasks")
        return list(DEFAULT_TASKS if tasks is None else tasks)

    def default_max_new_tokens(self, task: str) -> int:
        return TASKS[task]

    def task_metric(self, task: str) -> str:
        if task not in METRIC_NAMES:
            raise ConfigError(f"unknown synthetic task {task!r}; valid tasks: {', '.join(TASKS)}")
        return METRIC_NAMES[task]

    def haystack(self) -> str:
        """``cfg.haystack``: ``"generated"`` (the default) or a folder of ``.txt`` files."""
        return cfg_get(self.cfg, "haystack") or "generated"

    def validate(self) -> None:
        super().validate()
        tasks = self.tasks()
        valid = ", ".join(TASKS)
        if not tasks:
            raise ConfigError(f"benchmark.tasks is empty; choose from: {valid}")
        for t in tasks:
            if t not in TASKS:
                raise ConfigError(f"unknown synthetic task {t!r}; valid tasks: {valid}")
        hay = self.haystack()
        if hay == "generated" or self._essays:
            return
        hint = "valid: 'generated' or a readable folder holding non-empty .txt files"
        if not os.path.isdir(hay):
            raise ConfigError(f"benchmark.haystack={hay!r} is not a folder; {hint}")
        split = self.split()
        try:
            names = essay_files(hay, split)
            sentences = _read_essays(hay, names)
        except OSError as e:
            raise ConfigError(f"benchmark.haystack={hay!r} cannot be read ({e}); {hint}") from e
        if not sentences:
            raise ConfigError(
                f"benchmark.haystack={hay!r} has no text in the .txt files of split {split!r} "
                f"({len(names)} file(s); a file is dev when the SHA-1 of 'atskv-split:' + its "
                f"name is divisible by {ESSAY_DEV_ONE_IN}, test otherwise); {hint}, for both splits (dev, test)"
            )
        self._essays = sentences

    def load(self, tokenizer: Any, context_len: int, n: int | None, seed: int) -> list[Sample]:
        """``n`` samples per task (``None``: ``cfg.n_samples``, else 8) of the configured split,
        each of exactly ``context_len`` tokens; the same split and ``seed`` give identical
        ``input_ids``."""
        self.validate()
        n = n if n is not None else (cfg_get(self.cfg, "n_samples") or DEFAULT_N)
        if n < 1:
            raise ConfigError(f"synthetic benchmark needs n_samples >= 1, got {n}")
        split = self.split()
        samples: list[Sample] = []
        for task in self.tasks():
            grid = [0.5] if n == 1 else [round(0.05 + 0.9 * i / (n - 1), 4) for i in range(n)]
            built = []
            for i in range(n):
                rng = random.Random(f"atskv-synthetic/{split}:{seed}:{task}:{i}")
                spec = _make_spec(task, rng, split)
                head, tail = self._frame(tokenizer, spec)
                needles = [self._enc(tokenizer, " " + s) for s in spec.needles]
                fixed = len(head) + len(tail) + sum(map(len, needles))
                built.append((rng, spec, head, tail, needles, fixed))
            need = max(b[5] for b in built) + MIN_FILLER_TOKENS
            if context_len < need:
                raise ConfigError(
                    f"context_len={context_len} is too small for synthetic task {task!r}: "
                    f"the minimum is {need} tokens (prompt, question and needles plus "
                    f"{MIN_FILLER_TOKENS} haystack tokens)"
                )
            for i, (rng, spec, head, tail, needles, fixed) in enumerate(built):
                filler = self._filler(tokenizer, rng, context_len - fixed, split)
                depths = [round(rng.uniform(0.05, 0.95), 4) for _ in needles]
                depths[spec.target] = grid[i]
                if spec.ordered:
                    depths.sort()
                ids, spans = self._assemble(head, tail, filler, needles, depths)
                assert len(ids) == context_len, (len(ids), context_len)
                sample_id = f"synthetic/{split}/{task}/{context_len}/{seed}/{i}"
                asks = [(spec, tail)]
                if task == "multi_question":  # every needle in turn, the grid's first
                    order = [spec.target] + rng.sample(
                        [j for j in range(len(needles)) if j != spec.target], len(needles) - 1)
                    asks = [(q, self._frame(tokenizer, q)[1])
                            for q in (ask_for(spec, j) for j in order)]
                context = ids[: len(ids) - len(tail)]
                for position, (q, q_tail) in enumerate(asks):
                    meta = {
                        "depth": depths[q.target],
                        "depths": depths,
                        "needles": list(spec.needles),
                        "needle_spans": spans,
                        "answer_needles": list(q.answer_needles),
                        "answer_prefix": q.answer_prefix,
                        "question": q.question,
                        "haystack": self.haystack(),
                        "context_len": context_len,
                        "seed": seed,
                        "split": split,
                    }
                    if task == "multi_question":
                        meta.update(context_id=sample_id, question_position=position)
                    samples.append(
                        Sample(
                            id=sample_id + (f"/q{position}" if task == "multi_question" else ""),
                            task=task,
                            input_ids=context + q_tail,
                            references=list(q.references),
                            max_new_tokens=self.task_max_new_tokens(task),
                            meta=meta,
                            stop=[],
                            question_start=len(context),
                        )
                    )
        return samples

    def score(self, prediction: str, sample: Sample) -> float:
        """100 * fraction of references found verbatim in ``prediction`` (all-or-nothing for
        the single-reference tasks)."""
        refs = sample.references
        if not refs:
            return 0.0
        return 100.0 * sum(r in prediction for r in refs) / len(refs)

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _enc(tokenizer: Any, text: str, special: bool = False) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    def _frame(self, tokenizer: Any, spec: _Spec) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack: template head + instruction, then the
        question, the template's assistant header and the answer prefix."""
        marker = "\x00HAYSTACK\x00"
        content = f"{spec.head}\n\n{marker}\n\n{spec.question}"
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            before, after = text.split(marker)
            return self._enc(tokenizer, before), self._enc(tokenizer, after + spec.answer_prefix)
        before, after = content.split(marker)
        return (
            self._enc(tokenizer, before, special=True),
            self._enc(tokenizer, after + "\n" + spec.answer_prefix),
        )

    def _filler(
        self, tokenizer: Any, rng: random.Random, budget: int, split: str
    ) -> list[list[int]]:
        """Haystack sentences (token ids, leading space) totalling exactly ``budget`` tokens,
        from ``split``'s essays or vocabulary; the last one is cut at token level."""
        out: list[list[int]] = []
        total = 0
        if self._essays:
            if self._essay_tok is not tokenizer:
                enc = tokenizer([" " + s for s in self._essays], add_special_tokens=False)
                self._essay_ids = [list(x) for x in enc["input_ids"]]
                self._essay_tok = tokenizer
            pool = self._essay_ids
            pos = rng.randrange(len(pool))
            while total < budget:
                out.append(pool[pos % len(pool)])
                total += len(out[-1])
                pos += 1
        else:
            while total < budget:
                batch = [" " + _filler_sentence(rng, split) for _ in range(64)]
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    if total >= budget:
                        break
                    out.append(list(ids))
                    total += len(ids)
        if total > budget:
            out[-1] = out[-1][: len(out[-1]) - (total - budget)]
        return out

    @staticmethod
    def _assemble(
        head: list[int],
        tail: list[int],
        filler: list[list[int]],
        needles: list[list[int]],
        depths: list[float],
    ) -> tuple[list[int], list[list[int]]]:
        """Insert each needle at the sentence boundary nearest its depth (stable order for
        equal boundaries); return the ids and each needle's ``[start, end)`` token span."""
        bounds = [0]
        for s in filler[:-1]:  # never insert after the cut last sentence
            bounds.append(bounds[-1] + len(s))
        total = bounds[-1] + len(filler[-1])
        at = [
            min(range(len(bounds)), key=lambda b, d=d: abs(bounds[b] - d * total)) for d in depths
        ]
        ids = list(head)
        spans: list[list[int]] = [[] for _ in needles]
        order = sorted(range(len(needles)), key=lambda j: (at[j], depths[j], j))
        k = 0
        for b in range(len(filler) + 1):
            while k < len(order) and at[order[k]] == b:
                j = order[k]
                spans[j] = [len(ids), len(ids) + len(needles[j])]
                ids += needles[j]
                k += 1
            if b < len(filler):
                ids += filler[b]
        ids += tail
        return ids, spans
