"""Calibration data -> token examples with target masks.

Sources are read in order and turned into :class:`Example` objects: token ids plus a mask of
the positions whose token is a prediction target. Fisher information is an expectation over
the model's predictions, so only the tokens the model is meant to produce count: prompt
tokens (prompt/completion records) and non-assistant turns (chat records) are masked out.

Supported sources (detected from the path):

* ``*.txt``: one example per non-empty line.
* ``*.jsonl`` / ``*.json``: JSON lines, or a JSON array of objects.
* ``*.parquet``: one record per row (needs ``pyarrow``).
* a directory written by ``datasets.Dataset.save_to_disk`` (a Dataset or a DatasetDict).
* anything else that looks like ``org/name``: a Hugging Face Hub dataset.

A record is, by priority: ``messages`` (a chat, rendered with the tokenizer's chat template),
``prompt`` + ``completion`` (only the completion is a target; both may also be message lists,
TRL's conversational format), or the ``text_field`` (every token is a target).

Chat mask rule: the targets are the tokens of each assistant turn, found by rendering the chat
up to that turn (with the generation prompt) and through it, and diffing token prefixes of the
full rendering; the turn's end-of-turn token is a target, its role header is not, and neither is
what the template writes after the end-of-turn token (ChatML's, Gemma's and Phi-3's newline):
generation stops at that token, so text after it is never produced and only adds noise to a
loss. The end-of-turn token is the turn's last special token; a template without one keeps the
whole turn. A chat with no assistant turn has no target and is dropped. If a template makes the prefixes disagree (it
rewrites earlier turns), every token of the chat is a target and a warning is logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_fisher.errors import FisherError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["Batch", "CalibrationData", "DataError", "Example", "load_calibration_data", "pad_batch"]

logger = logging.getLogger(__name__)

_FINGERPRINT_VERSION = "mergekit-fisher-data-v2"  # v2: chat targets end at end-of-turn
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_KNOWN_SUFFIXES = _TEXT_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class DataError(FisherError):
    """One-line, user-facing error about calibration data: names the file/field and the fix."""


@dataclass(frozen=True)
class Example:
    """One tokenized sequence.

    ``target_mask[t]`` is True where token ``t`` is a prediction target (predicted from the
    tokens before it); position 0 never is, having nothing to be predicted from.
    """

    input_ids: tuple[int, ...]
    target_mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError("input_ids and target_mask must have the same length")
        if self.target_mask and self.target_mask[0]:
            raise ValueError("position 0 cannot be a target")

    @property
    def num_targets(self) -> int:
        return sum(self.target_mask)


@dataclass(frozen=True)
class CalibrationData:
    """Examples plus a fingerprint that identifies data and tokenization (stored as provenance)."""

    examples: tuple[Example, ...]
    fingerprint: str
    sources: tuple[str, ...]
    contents: tuple[str, ...] = ()
    """One hash per source read, of its content only: unlike ``fingerprint`` (which includes the
    tokenizer, i.e. the model's path), equal for two models estimated on the same data."""

    @property
    def num_tokens(self) -> int:
        """Number of target tokens over all examples."""
        return sum(ex.num_targets for ex in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------------
# Reading sources: each yields (location, record) where a record is a str (plain text line)
# or a dict. The location ("file:line", "file[row 3]") goes into error messages.


@dataclass
class _Source:
    name: str
    records: Iterator[tuple[str, str | dict[str, Any]]]
    identity: str
    content_hash: str = field(default="")


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8-sig") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e.reason}); re-save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None


def _txt_records(path: Path) -> Iterator[tuple[str, str | dict[str, Any]]]:
    for lineno, line in _read_lines(path):
        text = line.rstrip("\r\n")
        if text.strip():
            yield f"{path}:{lineno}", text


def _first_char(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("ascii", errors="replace")


def _json_records(path: Path) -> Iterator[tuple[str, str | dict[str, Any]]]:
    if _first_char(path) == "[":
        try:
            items = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason}); re-save as UTF-8") from None
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
            yield where, item
        return
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg}); expected one JSON object per line "
                "(JSON lines) or a JSON array of objects"
            ) from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield where, item


def _parquet_records(path: Path) -> Iterator[tuple[str, str | dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow: pip install mergekit-fisher[data]"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet file: {_first_line(e)}") from None
    row = 0
    for batch in pf.iter_batches():
        for item in batch.to_pylist():
            yield f"{path}[row {row}]", item
            row += 1


def _dataset_records(name: str, ds: Any) -> Iterator[tuple[str, str | dict[str, Any]]]:
    for i, item in enumerate(ds):
        yield f"{name}[row {i}]", item


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: loading datasets needs the 'datasets' package: "
            "pip install mergekit-fisher[data]"
        ) from None
    return datasets


def _open_disk_dataset(path: Path, split: str) -> _Source:
    datasets = _import_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk "
            f"({_first_line(e)}); pass a file or a saved dataset directory"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: no split {split!r} in this DatasetDict (has {sorted(ds)}); "
                "choose one with --split"
            )
        ds = ds[split]
    return _Source(
        name=str(path),
        records=_dataset_records(str(path), ds),
        identity=f"disk:{split}",
        content_hash=str(getattr(ds, "_fingerprint", "")),
    )


def _open_hub_dataset(source: str, split: str) -> _Source:
    datasets = _import_datasets(source)
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(
            f"{source}: not a local file and could not be loaded as a Hub dataset "
            f"(offline?): {_first_line(e)}"
        ) from None
    return _Source(
        name=source,
        records=_dataset_records(source, ds),
        identity=f"hub:{split}",
        content_hash=str(getattr(ds, "_fingerprint", "")),
    )


_READERS = {
    **dict.fromkeys(_TEXT_SUFFIXES, _txt_records),
    **dict.fromkeys(_JSON_SUFFIXES, _json_records),
    **dict.fromkeys(_PARQUET_SUFFIXES, _parquet_records),
}


def _classify(source: str) -> str:
    """Source kind ('dir', 'file', 'hub'), checked up front so a typo fails before any work."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return "dir"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _READERS:
            raise DataError(
                f"{path}: unsupported file type {suffix or '(none)'!r}; "
                "use .txt, .jsonl, .json, .parquet or a save_to_disk directory"
            )
        return "file"
    if _HUB_ID.match(source) and not source.lower().endswith(_KNOWN_SUFFIXES):
        return "hub"
    raise DataError(f"{source}: file not found; check the path")


def _open_source(source: str, kind: str, split: str) -> _Source:
    """Open a classified source; its records are a generator, read on demand."""
    if kind == "hub":
        return _open_hub_dataset(source, split)
    path = Path(os.path.expanduser(source))
    if kind == "dir":
        return _open_disk_dataset(path, split)
    return _Source(
        name=str(path),
        records=_READERS[path.suffix.lower()](path),
        identity="file",
        content_hash=_hash_file(path),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------
# Tokenization


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _example(ids: Sequence[int], first_target: int) -> Example:
    """Build an example whose targets are positions ``>= max(first_target, 1)``."""
    start = max(first_target, 1)
    return Example(tuple(ids), tuple(i >= start for i in range(len(ids))))


def _text_example(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> Example:
    ids = tokenizer(text, truncation=True, max_length=max_length, verbose=False)["input_ids"]
    return _example(ids, 1)


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int | None:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return i
    return None


def _prompt_completion_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int
) -> Example:
    """Tokenize ``prompt + completion`` and make only the completion's tokens targets.

    The special tokens the tokenizer adds (BOS in front, sometimes EOS behind) are located by
    finding the plain tokenization inside the full one. When the prompt's tokens are a prefix of
    the whole text's tokens, the whole text's natural tokenization is used and the prompt's
    token count is the mask boundary. Otherwise (a token spans the boundary) prompt and
    completion are tokenized separately and concatenated, so the mask stays exact. Truncation
    keeps the added special tokens, as the tokenizer's own truncation does.
    """
    full = _ids(tokenizer, prompt + completion, special=True)
    body = _ids(tokenizer, prompt + completion, special=False)
    head = _ids(tokenizer, prompt, special=False)
    lead_n = _find(full, body)
    if lead_n is None:  # a post-processor that rewrites the text's tokens: add no specials
        lead, tail = [], []
    else:
        lead, tail = full[:lead_n], full[lead_n + len(body) :]
    if body[: len(head)] != head:
        logger.debug("prompt tokens are not a prefix of prompt+completion; tokenizing apart")
        body = head + _ids(tokenizer, completion, special=False)
    ids = lead + body + tail
    if len(ids) > max_length:
        keep = max_length - len(lead) - len(tail)
        ids = lead + body[:keep] + tail if keep > 0 else ids[:max_length]
    return _example(ids, len(lead) + len(head))


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Any], gen_prompt: bool) -> str:
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, not str")
    return out


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    rendered: str,
    ids: list[int],
) -> list[tuple[int, int]] | None:
    """Token spans ``[start, end)`` of the assistant turns, or None if not robustly known.

    For each assistant message k, the chat up to k (with the generation prompt) and up to k+1
    are rendered; both must be string prefixes of the full rendering and token prefixes of its
    tokens, and the tokens between them are the assistant turn (its header excluded), cut after
    its end-of-turn token (see :func:`_end_of_turn`). Templates that rewrite earlier turns fail
    these checks.
    """
    special = _special_ids(tokenizer)
    spans = []
    for k, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:k], gen_prompt=True) if k else ""
            upto = _render(tokenizer, messages[: k + 1], gen_prompt=False)
        except Exception:
            return None
        if not (rendered.startswith(before) and rendered.startswith(upto)):
            return None
        bounds = []
        for prefix in (before, upto):
            prefix_ids = _ids(tokenizer, prefix, special=False) if prefix else []
            if ids[: len(prefix_ids)] != prefix_ids:
                return None
            bounds.append(len(prefix_ids))
        spans.append((bounds[0], _end_of_turn(ids, bounds[0], bounds[1], special)))
    return spans


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's special tokens: the named ones and every added token marked special
    (Llama-3's ``<|eot_id|>`` is only the latter in base tokenizers)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marked = {i for i, token in added.items() if getattr(token, "special", False)}
    return frozenset(tokenizer.all_special_ids) | marked


def _end_of_turn(ids: Sequence[int], start: int, end: int, special: frozenset[int]) -> int:
    """The end of an assistant turn's targets: just after its last special token (the
    end-of-turn token), or ``end`` when the turn has no special token after its first."""
    for t in range(end - 1, start, -1):
        if ids[t] in special:
            return t + 1
    return end


def _chat_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    max_length: int,
    where: str,
    warned: set[str],
) -> Example:
    """Render a chat with the tokenizer's template; targets are the assistant turns' tokens.

    If the assistant turns cannot be located robustly (see :func:`_assistant_spans`), every
    token is a target and a warning is logged once.
    """
    try:
        rendered = _render(tokenizer, messages, gen_prompt=False)
    except Exception as e:
        raise DataError(
            f"{where}: cannot apply the tokenizer's chat template to 'messages' "
            f"({_first_line(e)}); use a tokenizer with a chat template, or a text field"
        ) from None
    ids = _ids(tokenizer, rendered, special=False)  # the template writes BOS itself
    spans = _assistant_spans(tokenizer, messages, rendered, ids)
    if spans is None:
        if "chat" not in warned:
            warned.add("chat")
            logger.warning(
                "%s: cannot locate assistant turns in the chat template's output; "
                "using every token of chat examples as a target",
                where,
            )
        ex = _example(ids[:max_length], 1)
    else:
        mask = [False] * len(ids)
        for start, end in spans:
            for t in range(max(start, 1), end):
                mask[t] = True
        ex = Example(tuple(ids[:max_length]), tuple(mask[:max_length]))
    return ex


def _check_messages(messages: Any, where: str, key: str) -> list[dict[str, Any]]:
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
    )
    if not ok or not messages:
        raise DataError(
            f"{where}: {key} must be a non-empty list of {{role, content}} objects; fix the record"
        )
    return messages


def _record_kind(record: str | dict[str, Any], where: str, text_field: str) -> str:
    """Which kind a record is: 'messages' > 'prompt_completion' > 'text'."""
    if isinstance(record, str):
        return "text"
    if record.get("messages") is not None:
        return "messages"
    if record.get("prompt") is not None and record.get("completion") is not None:
        return "prompt_completion"
    if record.get(text_field) is not None:
        return "text"
    raise DataError(
        f"{where}: record has none of the fields looked for: 'messages', 'prompt'+'completion' "
        f"or {text_field!r} (has {sorted(record)[:8]}); name the text field with --text-field"
    )


def _tokenize_record(
    tokenizer: PreTrainedTokenizerBase,
    record: str | dict[str, Any],
    kind: str,
    where: str,
    text_field: str,
    max_length: int,
    warned: set[str],
) -> Example:
    if isinstance(record, str):
        return _text_example(tokenizer, record, max_length)
    if kind == "messages":
        messages = _check_messages(record["messages"], where, "'messages'")
        return _chat_example(tokenizer, messages, max_length, where, warned)
    if kind == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational
            messages = _check_messages(prompt + completion, where, "prompt + completion")
            return _chat_example(tokenizer, messages, max_length, where, warned)
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise DataError(
                f"{where}: 'prompt' and 'completion' must both be strings (or both message "
                f"lists), got {type(prompt).__name__} and {type(completion).__name__}"
            )
        return _prompt_completion_example(tokenizer, prompt, completion, max_length)
    return _text_example(tokenizer, _text_of(record, text_field, where), max_length)


def _text_of(record: str | dict[str, Any], text_field: str, where: str) -> str:
    """A plain-text record's text (the record itself, or its ``text_field``)."""
    text = record if isinstance(record, str) else record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {text_field!r} is {type(text).__name__}, expected a string; "
            "choose another field with --text-field"
        )
    return text


def _pack(texts: Iterable[list[int]], eos_id: int, max_length: int) -> Iterator[Example]:
    """Join tokenized texts with EOS into chunks of exactly ``max_length`` tokens.

    The last, partial chunk is kept when it has at least one target (>= 2 tokens).
    """
    buf: list[int] = []
    first = True
    for ids in texts:
        if not first and (not buf or buf[-1] != eos_id):
            buf.append(eos_id)
        first = False
        buf.extend(ids)
        while len(buf) >= max_length:
            yield _example(buf[:max_length], 1)
            buf = buf[max_length:]
    if len(buf) >= 2:
        yield _example(buf, 1)


# --------------------------------------------------------------------------------------------
# Public entry point


def load_calibration_data(
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    num_samples: int | None = None,
    text_field: str = "text",
    split: str = "train",
    pack: bool = False,
) -> CalibrationData:
    """Read ``sources`` round-robin and tokenize them into examples with target masks.

    Each example is truncated to ``max_length`` tokens. Examples left with no target token
    (e.g. a prompt that fills ``max_length``) are dropped and counted. ``num_samples`` keeps the
    first N examples that survive (reading stops there), taken alternately from the sources so
    that N samples of several files are a mixture of them; None keeps all. ``pack`` joins
    plain-text records with EOS and cuts the stream into ``max_length`` chunks (every position
    but the first is a target); it refuses prompt/completion and chat records, whose masks
    packing would blur. Raises :class:`DataError` for any bad input.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    sources = tuple(os.fspath(s) for s in sources)
    _check_arguments(sources, tokenizer, max_length, num_samples, pack)
    reader = _Reader(sources, [_classify(s) for s in sources], split, text_field)
    examples, dropped = _keep_targeted(reader.examples(tokenizer, max_length, pack), num_samples)
    _check_result(sources, reader.records_read, len(examples), dropped, max_length, num_samples)
    settings = {"max_length": max_length, "text_field": text_field, "pack": pack}
    data = CalibrationData(
        examples=tuple(examples),
        fingerprint=_fingerprint(
            sources, reader.opened, tokenizer, **settings, num_samples=num_samples, split=split
        ),
        sources=sources,
        contents=_contents(reader.opened),
    )
    logger.info(
        "calibration data: %d examples, %d target tokens from %s",
        len(data.examples),
        data.num_tokens,
        ", ".join(sources),
    )
    return data


def _check_arguments(
    sources: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_samples: int | None,
    pack: bool,
) -> None:
    if not sources:
        raise DataError("no calibration data given; pass at least one file or dataset")
    if max_length < 2:
        raise DataError(f"max_length={max_length}: needs at least 2 tokens to have a target")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"num_samples={num_samples}: must be at least 1 (or unset for all)")
    if pack and getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("pack needs a tokenizer with an eos_token to separate texts")


@dataclass
class _Reader:
    """The sources' records, round-robin (N samples of several files are a mixture of them),
    opened lazily: a source after the one where reading stopped is never opened."""

    sources: Sequence[str]
    kinds: Sequence[str]
    split: str
    text_field: str
    opened: list[_Source] = field(default_factory=list)
    records_read: int = 0

    def records(self) -> Iterator[tuple[str, str | dict[str, Any], str]]:
        """(where, record, record kind) for each record."""
        streams = []
        for source, kind in zip(self.sources, self.kinds):
            src = _open_source(source, kind, self.split)
            self.opened.append(src)
            streams.append(iter(src.records))
        while streams:
            for stream in list(streams):
                item = next(stream, None)
                if item is None:
                    streams.remove(stream)
                    continue
                where, record = item
                self.records_read += 1
                yield where, record, _record_kind(record, where, self.text_field)

    def examples(
        self, tokenizer: PreTrainedTokenizerBase, max_length: int, pack: bool
    ) -> Iterator[Example]:
        """One example per record, or (``pack``) the texts joined and cut into chunks."""
        if pack:
            yield from _pack(self._texts(tokenizer), tokenizer.eos_token_id, max_length)
            return
        warned: set[str] = set()
        for where, record, kind in self.records():
            yield _tokenize_record(
                tokenizer, record, kind, where, self.text_field, max_length, warned
            )

    def _texts(self, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
        for where, record, kind in self.records():
            if kind != "text":
                raise DataError(
                    f"{where}: pack works only on plain-text records, not {kind} records "
                    "(their prompt masks would be lost); drop --pack"
                )
            yield _ids(tokenizer, _text_of(record, self.text_field, where), special=True)


def _keep_targeted(stream: Iterator[Example], num_samples: int | None) -> tuple[list[Example], int]:
    """The first ``num_samples`` examples with a target token (reading stops there), and how
    many without one were dropped on the way."""
    examples: list[Example] = []
    dropped = 0
    for ex in stream:
        if ex.num_targets < 1:
            dropped += 1
            continue
        examples.append(ex)
        if num_samples is not None and len(examples) >= num_samples:
            break
    return examples, dropped


def _check_result(
    sources: Sequence[str],
    records: int,
    kept: int,
    dropped: int,
    max_length: int,
    num_samples: int | None,
) -> None:
    """Refuse data that yields nothing; say what was dropped or missing."""
    label = ", ".join(sources)
    if records == 0:
        raise DataError(f"empty dataset: {label} has no records; check the files and --split")
    if dropped:
        logger.warning(
            "dropped %d of %d examples with no target token (prompt longer than "
            "max_length=%d, or no assistant turn)",
            dropped,
            dropped + kept,
            max_length,
        )
    if not kept:
        raise DataError(
            f"no example has a target token: all {dropped} examples from {label} "
            f"are fully masked or too short; raise --max-length or check the prompt fields"
        )
    if num_samples is not None and kept < num_samples:
        logger.info("asked for %d samples, the data has %d", num_samples, kept)


def _fingerprint(
    sources: Sequence[str],
    opened: Sequence[_Source],
    tokenizer: PreTrainedTokenizerBase,
    **settings: Any,
) -> str:
    """sha256 over the sources (names, kinds, content hashes) and every tokenization setting.

    Content is the file's bytes, or datasets' own ``_fingerprint`` for datasets. Sources after the one where ``num_samples`` was reached are never opened: they do not
    shape the examples, so only their names count.
    """
    template = getattr(tokenizer, "chat_template", None)
    payload = {
        "version": _FINGERPRINT_VERSION,
        "sources": list(sources),
        "read": [[s.identity, s.content_hash] for s in opened],
        "settings": settings,
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
            "chat_template": hashlib.sha256(str(template).encode()).hexdigest()
            if template
            else None,
        },
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _contents(opened: Sequence[_Source]) -> tuple[str, ...]:
    """sha256 of each read source's kind and content (sources without a content hash: none)."""
    return tuple(
        hashlib.sha256(f"{s.identity}\0{s.content_hash}".encode()).hexdigest()
        for s in opened
        if s.content_hash
    )


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a few examples: what a model forward needs, plus the targets."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 0 on padding
    target_mask: torch.Tensor  # [B, T] bool, False on padding


def pad_batch(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` to their longest length; padding is never attended or a target."""
    import torch

    length = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    attention = torch.zeros((len(examples), length), dtype=torch.int64)
    targets = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.int64)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(ex.target_mask, dtype=torch.bool)
    return Batch(ids, attention, targets)
