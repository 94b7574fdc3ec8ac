"""How a benchmark's prompts meet a method: with the question in view or not.

A sample's prompt is its context followed by its question part (``Sample.question_start``: the
question, the template's tail and the answer prefix). Two protocols (``protocol=...``):

* ``question_aware``: the whole prompt is prefilled and compressed, the question inside the
  compressed part (SnapKV's paper protocol; the question sits in the observation window that the
  score-based methods read);
* ``question_agnostic``: the context is prefilled and compressed alone; the question part is
  then appended on top of the compressed cache, uncompressed, with exact attention
  (:meth:`Engine.extend`), and generation runs as before (kvpress's default evaluation; a
  document compressed once and then asked about). Methods that score with the last prompt
  queries use the context's own last tokens.

Samples that share a context (``meta["context_id"]``: the multi-question synthetic task) are
answered from one compression of it: under ``question_agnostic`` the context is compressed
without any question and each question starts from its own copy of that compression (the
earlier questions and answers are not kept, as kvpress's pipeline does); under
``question_aware`` the context is compressed with the **first** question in view (its tokens
compressed with it, as a single question is), the first question is answered from it, and every
later question is appended to a copy of that compression from which the first question's kept
tokens were removed (:meth:`Engine.forget`: as if the prompt were the context and this question;
the first question took its share of the budget, as a question does in this protocol). A method
that keeps only what the first question needed shows it in the accuracy by question position.

One prefill of the context serves both protocols (the question-aware prompt continues it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from atskv.core.engine import Engine, Prefill, Request
from atskv.core.method import Method
from atskv.core.types import ConfigError, GenerationOutput, Sample

PROTOCOLS = ("question_aware", "question_agnostic")
#: what happens to a question and its answer before the next question of the same context
#: (recorded in result.json)
MULTI_QUESTION = ("each question from its own copy of the context's compression; earlier "
                  "questions and answers removed (question_aware: compressed with the first "
                  "question in view, which is removed before the later ones)")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def check_splits(samples: Sequence[Sample], protocols: set[str]) -> None:
    """Every sample of a question-agnostic run must say where its question starts."""
    if "question_agnostic" not in protocols:
        return
    bad = [s.id for s in samples if s.question_start is None or not
           0 < s.question_start < len(s.input_ids)]
    if bad:
        raise ConfigError(f"protocol=question_agnostic needs every prompt split into context and "
                          f"question, but samples {bad[:3]} have no split (question_start); use "
                          f"protocol=question_aware")


def context_groups(samples: Sequence[Sample]) -> Iterator[list[Sample]]:
    """Consecutive samples sharing ``meta["context_id"]`` as one group; every other sample
    alone."""
    group: list[Sample] = []
    for s in samples:
        key = s.meta.get("context_id")
        if group and (key is None or key != group[0].meta.get("context_id")):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


def question(sample: Sample) -> list[int]:
    assert sample.question_start is not None
    return sample.input_ids[sample.question_start :]


@dataclass
class Prefills:
    """The prefills a group of samples needs: the context alone (question-agnostic members),
    the first sample's whole prompt (question-aware members), or both from one pass over the
    context."""

    context: Prefill | None
    aware: Prefill | None

    @classmethod
    def make(cls, engine: Engine, group: Sequence[Sample], protocols: set[str],
             queries: int) -> Prefills:
        first = group[0]
        if "question_agnostic" not in protocols:
            return cls(None, engine.prefill(first.input_ids, queries))
        context = engine.prefill(first.input_ids[: first.question_start], queries)
        aware = (engine.prefill(question(first), queries, base=context)
                 if "question_aware" in protocols else None)
        return cls(context, aware)


def requests(engine: Engine, group: Sequence[Sample], prefills: Prefills, method: Method,
             protocol: str, consume: bool = False) -> list[Request]:
    """The generations that answer a group of samples with ``method`` under ``protocol``
    (module docstring): one compression of the context, a copy of it for every question but
    the last. With ``consume`` the prefill's tensors are freed as they are compressed (a
    prefill no other member needs)."""
    agnostic = protocol == "question_agnostic"
    pre = prefills.context if agnostic else prefills.aware
    assert pre is not None
    appended = [(len(question(s)) if agnostic or i else 0) + s.max_new_tokens
                for i, s in enumerate(group)]
    compressed = engine.compress(pre, method, max(appended), consume and len(group) == 1,
                                 question_follows=agnostic)
    reqs = []
    for i, s in enumerate(group):
        last = i == len(group) - 1
        if agnostic or i == 0:
            reqs.append(Request(pre, method, s.max_new_tokens, stop=s.stop,
                                question=question(s) if agnostic else (),
                                compressed=compressed if last else compressed.copy()))
        else:  # the first question (compressed with the context) removed, this one appended
            start = group[0].question_start
            reqs.append(Request(pre, method, s.max_new_tokens, stop=s.stop, question=question(s),
                                compressed=engine.forget(compressed, method, start, not last),
                                start=start))
    return reqs


def answer(engine: Engine, group: Sequence[Sample], prefills: Prefills, method: Method,
           protocol: str, consume: bool = False) -> list[GenerationOutput]:
    """One method's answers to a group of samples (decoded together)."""
    return engine.generate_batch(requests(engine, group, prefills, method, protocol, consume))
