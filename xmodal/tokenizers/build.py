"""``data.tokenizer`` → a tokenizer: checked, fitted on a bounded sample, rebuilt from a state.

The node names the class by ``_target_`` (default: the word tokenizer); ``max_fit_captions`` bounds
how many training captions the fit reads; every other key is an option of the class's ``fit``::

    data:
      tokenizer:
        _target_: xmodal.tokenizers.subword.SubwordTokenizer
        max_fit_captions: 200000
        vocab_size: 1000

A state (``tokenizer.state()``) rebuilds any tokenizer without the data: checkpoints' hparams and
run dirs' ``tokenizer.json`` hold one. States written before tokenizers were plug-ins are a bare
``{"vocab": [...]}`` (run dirs) or a ``vocab`` hyperparameter (checkpoints): both are word
tokenizers.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xmodal.registry import import_object
from xmodal.tokenizers.base import TARGET, Tokenizer

DEFAULT_TARGET = "xmodal.tokenizers.word.WordTokenizer"
DEFAULT_MAX_FIT_CAPTIONS = 200_000
BUILD_KEYS = (TARGET, "max_fit_captions")
"""Keys of the node that are not options of ``fit``."""
PROTOCOL = ("fit", "from_state", "encode", "encode_batch", "decode", "state")
EXAMPLES = 3  # captions quoted by the empty-caption warning


class TokenizerError(ValueError):
    """A ``data.tokenizer`` node or a tokenizer state that cannot build a tokenizer."""


class EmptyCaptionWarning(UserWarning):
    """Training captions that the fitted tokenizer turns into no token at all."""


def target(spec: Mapping[str, Any] | None) -> str:
    return str((spec or {}).get(TARGET) or DEFAULT_TARGET)


def fit_options(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keys of the node that ``fit`` receives."""
    return {k: v for k, v in (spec or {}).items() if k not in BUILD_KEYS}


def max_fit_captions(spec: Mapping[str, Any] | None) -> int:
    return int((spec or {}).get("max_fit_captions") or DEFAULT_MAX_FIT_CAPTIONS)


def tokenizer_problems(spec: Any, key: str = "data.tokenizer") -> list[str]:
    """Every problem of a ``data.tokenizer`` node, as ``<key>: <why> (got <value>)``."""
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        return [f"{key}: must be a mapping with _target_ (got {spec!r})"]
    problems = []
    limit = spec.get("max_fit_captions", DEFAULT_MAX_FIT_CAPTIONS)
    if not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        problems.append(f"{key}.max_fit_captions: must be an integer >= 1 (got {limit!r})")
    name = target(spec)
    try:
        cls = import_object(name)
    except (ImportError, AttributeError) as err:
        return [*problems, f"{key}._target_: cannot import {name!r} ({type(err).__name__}: {err})"]
    lacking = [m for m in PROTOCOL if not callable(getattr(cls, m, None))]
    if lacking:
        return [
            *problems,
            f"{key}._target_: {name!r} is not a tokenizer class: it lacks {', '.join(lacking)} "
            "(the protocol of xmodal/tokenizers/base.py)",
        ]
    options = fit_options(spec)
    accepted = _fit_parameters(cls)
    if accepted is not None:
        for option in options:
            if option not in accepted:
                problems.append(
                    f"{key}.{option}: not an option of {cls.__name__}.fit "
                    f"(options: {', '.join(('max_fit_captions', *accepted))})"
                )
    if not problems and callable(getattr(cls, "problems", None)):
        problems += [f"{key}.{line}" for line in cls.problems(options)]
    return problems


def _fit_parameters(cls: type) -> list[str] | None:
    """Keyword options of ``cls.fit`` after the captions; None when it takes ``**options``."""
    params = list(inspect.signature(cls.fit).parameters.values())[1:]  # [0]: the captions
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


def fit_tokenizer(spec: Mapping[str, Any] | None, captions: Iterable[str], max_len: int = 64) -> Tokenizer:
    """The tokenizer of ``spec`` fitted on at most ``max_fit_captions`` of ``captions`` (the rest
    are never read). Warns once (:class:`EmptyCaptionWarning`) when some of them tokenize to
    nothing; ``max_len`` is the training length, so that check also fills the memo for training."""
    problems = tokenizer_problems(spec)
    if problems:
        raise TokenizerError("; ".join(problems))
    cls = import_object(target(spec))
    sample = list(itertools.islice(captions, max_fit_captions(spec)))
    tokenizer = cls.fit(sample, **fit_options(spec))
    warn_empty_captions(tokenizer, sample, max_len)
    return tokenizer


def empty_captions(tokenizer: Tokenizer, captions: Sequence[str], max_len: int) -> list[str]:
    """The captions (with repeats) that encode to BOS + EOS alone."""
    empty: dict[str, bool] = {}
    for caption in captions:
        if caption not in empty:
            empty[caption] = len(tokenizer.encode(caption, max_len)) <= 2
    return [c for c in captions if empty[c]]


def warn_empty_captions(tokenizer: Tokenizer, captions: Sequence[str], max_len: int) -> None:
    empty = empty_captions(tokenizer, captions, max_len)
    if not empty:
        return
    examples = ", ".join(repr(c[:60]) for c in list(dict.fromkeys(empty))[:EXAMPLES])
    warnings.warn(
        f"{len(empty)} of {len(captions)} training captions read to fit the tokenizer "
        f"({type(tokenizer).__name__}) tokenize to nothing, e.g. {examples}: they train as empty "
        "captions; choose a tokenizer for their script or language (data.tokenizer)",
        EmptyCaptionWarning,
        stacklevel=2,
    )


def tokenizer_from_state(state: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer a state describes (a state without ``_target_`` is a word vocabulary)."""
    name = target(state)
    try:
        cls = import_object(name)
    except (ImportError, AttributeError) as err:
        raise TokenizerError(f"tokenizer state: cannot import its _target_ {name!r} ({err})") from err
    return cls.from_state(state)


def task_tokenizer(
    state: Mapping[str, Any] | Sequence[str] | None, vocab: Sequence[str] | None = None
) -> Tokenizer:
    """A task's tokenizer from its ``tokenizer`` hyperparameter, or from the ``vocab`` list that
    checkpoints written before tokenizer plug-ins hold instead (code that still passes a word
    list where the state goes, as ``Task(model, vocab, data)`` was called, gets the same)."""
    if isinstance(state, Sequence) and not isinstance(state, str):
        state, vocab = None, state
    if state is not None:
        return tokenizer_from_state(state)  # type: ignore[arg-type]
    if vocab is not None:
        from xmodal.tokenizers.word import WordTokenizer

        return WordTokenizer(list(vocab))
    raise TypeError("a task needs tokenizer= (a tokenizer state; older checkpoints: vocab=)")
