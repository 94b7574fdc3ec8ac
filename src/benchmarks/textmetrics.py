"""Helpers shared by the long-document benchmarks (LongBench, ZeroSCROLLS).

* token-exact prompt assembly: chat-template wrapping split into the ids before and after the
  user content, so truncation can be computed on the content alone and still hit the budget;
* middle truncation (keep the head and the tail of a token sequence);
* deterministic per-task subsets and the dev/test split of records by a hash of their id;
* streaming JSON-lines readers whose errors name the file, the line and the field;
* the QA F1 used by both suites (LongBench's ``qa_f1_score`` from lm-eval, which is the SQuAD F1
  that ZeroSCROLLS also uses).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from atskv.core.types import ConfigError

_SENTINEL = "\u2063ATSKV_CONTENT\u2063"


# --------------------------------------------------------------------------------------------
# lm-eval's LongBench metric functions (lm-eval==0.4.13, lm_eval/tasks/longbench/metrics.py)


@lru_cache(maxsize=1)
def lm_eval_longbench_metrics() -> Any:
    """The module holding lm-eval's LongBench metric functions (imported lazily: it pulls in
    jieba, fuzzywuzzy and rouge)."""
    try:
        with warnings.catch_warnings():
            # fuzzywuzzy warns that it falls back to difflib when python-Levenshtein is absent.
            warnings.simplefilter("ignore", UserWarning)
            from lm_eval.tasks.longbench import metrics
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "LongBench/ZeroSCROLLS scoring reuses lm-eval's LongBench metrics: install "
            f"lm-eval==0.4.13 with jieba, fuzzywuzzy and rouge ({e})"
        ) from e
    return metrics


def qa_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 in [0, 1] (lower-case, drop punctuation and articles)."""
    return float(lm_eval_longbench_metrics().qa_f1_score(prediction, reference))


def max_over_references(fn: Any, prediction: str, references: Iterable[str], **kw: Any) -> float:
    return max((float(fn(prediction, ref, **kw)) for ref in references), default=0.0)


# --------------------------------------------------------------------------------------------
# Token-level prompt assembly


def encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without any special tokens added by the tokenizer."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_split(tokenizer: Any, text: str, at: int) -> tuple[list[int], int]:
    """``encode(text)`` and the index of its first token that lies at or after character ``at``
    (a token straddling ``at`` belongs to the second part): where a prompt's question part
    begins, found without tokenizing the two parts apart (which could change the ids at the
    seam). Tokenizers without offsets fall back to the length of ``text[:at]``'s ids."""
    if not getattr(tokenizer, "is_fast", False):
        return encode(tokenizer, text), len(encode(tokenizer, text[:at]))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    index = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > at), len(ids))
    return ids, index


def _find_sublist(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return -1


def prompt_wrapper(tokenizer: Any, chat: bool) -> tuple[list[int], list[int], bool]:
    """``(prefix_ids, suffix_ids, used_chat)``: the ids that go before and after the user content.

    With ``chat`` and a tokenizer that has a chat template, the content is one user turn followed
    by the generation prompt. Otherwise the wrapper holds whatever special tokens the tokenizer
    adds on its own (BOS for most Llama tokenizers; nothing for SmolLM2)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        if text.count(_SENTINEL) == 1:
            before, after = text.split(_SENTINEL)
            return encode(tokenizer, before), encode(tokenizer, after), True
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, "x")
    at = _find_sublist(with_special, plain)
    if at < 0:
        return [], [], False
    return with_special[:at], with_special[at + len(plain) :], False


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
    """Keep the first ``budget // 2`` and the last ``budget - budget // 2`` ids (LongBench's
    truncation, made token-exact: the result has exactly ``budget`` ids when it truncates)."""
    ids = list(ids)
    if budget < 0:
        raise ValueError(f"negative token budget {budget}")
    if len(ids) <= budget:
        return ids
    head = budget // 2
    tail = budget - head
    return ids[:head] + (ids[-tail:] if tail else [])


def kept_index(index: int, n: int, budget: int) -> int:
    """Where token ``index`` of ``n`` lands after :func:`middle_truncate` to ``budget`` (an index
    in the dropped middle goes to the start of the kept tail)."""
    if n <= budget:
        return index
    head, tail = budget // 2, budget - budget // 2
    if index >= n - tail:
        return head + index - (n - tail)
    return min(index, head)


# --------------------------------------------------------------------------------------------
# Config and data helpers


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """Attribute (or mapping key) ``name`` of a duck-typed config, ``default`` when absent."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def requested_tasks(cfg: Any) -> list[str] | None:
    tasks = cfg_get(cfg, "tasks")
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [t for t in tasks.replace(",", " ").split() if t]
    return [str(t) for t in tasks]


def check_task_names(suite: str, tasks: Iterable[str], valid: Sequence[str]) -> None:
    for task in tasks:
        if task not in valid:
            close = difflib.get_close_matches(task, list(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {suite} task {task!r}.{hint} Valid tasks: {', '.join(valid)}"
            )


def subset_indices(total: int, n: int | None, seed: int) -> list[int]:
    """Indices of a deterministic subset of ``n`` of ``total`` items (all when ``n`` is None
    or at least ``total``), chosen by ``seed`` and returned in dataset order."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), max(0, n)))


SPLITS: tuple[str, ...] = ("dev", "test")
"""The splits every benchmark offers (``benchmark.split``): ``dev`` for tuning, ``test`` for
reported numbers; disjoint by construction."""


SPLIT_SALT = "atskv-split:"


def hash_split(key: str, dev_one_in: int) -> str:
    """``"dev"`` when the SHA-1 of ``"atskv-split:" + key`` (UTF-8), read as a big-endian
    integer, is divisible by ``dev_one_in``, else ``"test"``: a stable split (about one key in
    ``dev_one_in`` is dev) that depends on nothing but the key."""
    digest = hashlib.sha1((SPLIT_SALT + key).encode("utf-8")).hexdigest()
    return "dev" if int(digest, 16) % dev_one_in == 0 else "test"


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line_number, record)`` from a JSON-lines file (1-based line numbers; blank lines
    skipped). Malformed lines raise :class:`ConfigError` naming the file and the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def check_fields(record: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str) -> None:
    """Raise :class:`ConfigError` (``where`` names the file and line) when a field is missing
    or has the wrong type. A type tuple holding ``type(None)`` allows null."""
    for name, types in fields.items():
        if name not in record:
            raise ConfigError(f"{where}: record is missing required field {name!r}")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(
                f"{where}: field {name!r} should be {wanted}, got {type(value).__name__}"
            )


def hub_load(
    candidates: Sequence[tuple[str, str]], split: str, data_dir_hint: str
) -> list[dict[str, Any]]:
    """Records of the first ``datasets.load_dataset(path, name, split=split)`` that works among
    ``candidates`` (each also tried on its parquet-conversion branch, since script-based hub
    datasets no longer load with recent ``datasets``). If none works (offline, unknown config,
    ...) raise a :class:`ConfigError` that says how to use a local copy instead."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ConfigError(f"loading hub datasets needs the 'datasets' package ({e})") from e
    errors = []
    for path, name in candidates:
        for kwargs in ({}, {"revision": "refs/convert/parquet"}):
            try:
                ds = datasets.load_dataset(path, name, split=split, **kwargs)
                return [dict(r) for r in ds]
            except Exception as e:  # every failure is reported to the user
                first = str(e).splitlines()[0] if str(e) else ""
                errors.append(f"{path}/{name} {kwargs or ''}: {type(e).__name__}: {first}")
    raise ConfigError(
        f"could not load split {split!r} from the Hugging Face hub ({'; '.join(errors)}). "
        f"Offline, download the files and point benchmark.data_dir at the local folder: "
        f"{data_dir_hint}"
    )
