"""Tests for mergekit_fisher.data: every source kind, masking, packing, fingerprints, errors.

Tokenizers are tiny byte-level BPEs trained in memory (no downloads); the code paths are real.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from mergekit_fisher.data import CalibrationData, DataError, Example, load_calibration_data

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "question: what is two plus two? answer: four",
    "user assistant system hello there",
]


def _make_tokenizer(
    eos_after: bool = False, template: str = CHATML, extra_specials: tuple[str, ...] = ()
):
    """A byte-level BPE with BOS added in front (and EOS behind if ``eos_after``), a chat
    ``template`` and its ``extra_specials`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", *extra_specials]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    bos, eos = ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))
    single = "<s> $A </s>" if eos_after else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[bos, eos])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", name_or_path="tiny-bpe"
    )
    out.chat_template = template
    return out


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def tok_eos():
    return _make_tokenizer(eos_after=True)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _ids(tok, text: str, special: bool = True) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=special)["input_ids"])


def _targets(tok, ex: Example) -> str:
    return tok.decode([i for i, m in zip(ex.input_ids, ex.target_mask) if m])


def _assert_plain(tok, ex: Example, text: str) -> None:
    assert ex.input_ids == _ids(tok, text)
    assert ex.target_mask == (False,) + (True,) * (len(ex.input_ids) - 1)


# ------------------------------------------------------------------------------- source kinds


def test_txt_one_example_per_nonempty_line(tmp_path, tok):
    path = tmp_path / "data.txt"
    path.write_text("hello world\n\n   \nthe quick brown fox\n", encoding="utf-8")
    data = load_calibration_data([str(path)], tok)
    assert isinstance(data, CalibrationData)
    assert len(data.examples) == 2
    _assert_plain(tok, data.examples[0], "hello world")
    _assert_plain(tok, data.examples[1], "the quick brown fox")
    assert data.num_tokens == sum(len(e.input_ids) - 1 for e in data.examples)
    assert data.sources == (str(path),)


def test_jsonl_text_and_custom_field(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "lazy dog"}])
    data = load_calibration_data([path], tok)
    _assert_plain(tok, data.examples[0], "hello world")
    _assert_plain(tok, data.examples[1], "lazy dog")

    path2 = _write_jsonl(tmp_path / "c.jsonl", [{"body": "quick fox", "id": 1}])
    data2 = load_calibration_data([str(path2)], tok, text_field="body")
    _assert_plain(tok, data2.examples[0], "quick fox")


def test_json_array(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "hello world"}, {"text": "fox"}], indent=2))
    data = load_calibration_data([str(path)], tok)
    assert [e.input_ids for e in data.examples] == [_ids(tok, "hello world"), _ids(tok, "fox")]


def test_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"text": ["hello world", None], "prompt": [None, "question: two?"]})
    table = table.append_column("completion", pa.array([None, " four"]))
    pq.write_table(table, path)
    data = load_calibration_data([str(path)], tok)
    _assert_plain(tok, data.examples[0], "hello world")
    pc = data.examples[1]
    assert pc.input_ids == _ids(tok, "question: two? four")
    assert _targets(tok, pc) == " four"


def test_save_to_disk_dataset_and_datasetdict(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "hello world"}, {"text": "lazy dog"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_calibration_data([str(tmp_path / "ds")], tok)
    assert [e.input_ids for e in data.examples] == [_ids(tok, "hello world"), _ids(tok, "lazy dog")]

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "train row"}]),
        validation=datasets.Dataset.from_list([{"text": "quick fox"}, {"text": "brown"}]),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train = load_calibration_data([str(tmp_path / "dd")], tok)
    assert [e.input_ids for e in train.examples] == [_ids(tok, "train row")]
    val = load_calibration_data([str(tmp_path / "dd")], tok, split="validation")
    assert [e.input_ids for e in val.examples] == [_ids(tok, "quick fox"), _ids(tok, "brown")]
    assert val.fingerprint != train.fingerprint
    with pytest.raises(DataError, match=r"no split 'test'.*--split"):
        load_calibration_data([str(tmp_path / "dd")], tok, split="test")


def test_directory_that_is_not_a_dataset(tmp_path, tok):
    pytest.importorskip("datasets")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_calibration_data([str(tmp_path / "junk")], tok)


def test_hub_dataset_via_load_dataset(monkeypatch, tok):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": "hello world"}, {"text": "fox"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_calibration_data(["org/calib"], tok, split="validation")
    assert calls == [("org/calib", "validation")]
    assert [e.input_ids for e in data.examples] == [_ids(tok, "hello world"), _ids(tok, "fox")]
    assert data.sources == ("org/calib",)


def test_hub_dataset_failure_is_a_data_error(monkeypatch, tok):
    datasets = pytest.importorskip("datasets")

    def offline(name, split=None, **kw):
        raise ConnectionError("Couldn't reach 'org/calib' on the Hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"org/calib: not a local file.*offline\?.*reach") as e:
        load_calibration_data(["org/calib"], tok)
    assert "\n" not in str(e.value)


def test_hub_dataset_without_datasets_installed(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install mergekit-fisher\[data\]"):
        load_calibration_data(["org/calib"], tok)


def test_sources_are_read_in_order(tmp_path, tok):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    b = tmp_path / "b.txt"
    b.write_text("world\n")
    data = load_calibration_data([str(b), str(a)], tok)
    assert [e.input_ids for e in data.examples] == [_ids(tok, "world"), _ids(tok, "hello")]
    assert data.sources == (str(b), str(a))


# ----------------------------------------------------------------------------------- masking


def test_prompt_completion_mask_token_by_token(tmp_path, tok):
    prompt, completion = "question: what is two plus two? answer:", " four"
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    (ex,) = load_calibration_data([str(path)], tok).examples
    n_prompt = len(_ids(tok, prompt))  # BOS + prompt tokens
    assert _ids(tok, prompt) == _ids(tok, prompt + completion)[:n_prompt]  # natural prefix case
    assert ex.input_ids == _ids(tok, prompt + completion)
    assert ex.target_mask == (False,) * n_prompt + (True,) * (len(ex.input_ids) - n_prompt)
    assert _targets(tok, ex) == completion


def test_prompt_completion_with_token_across_the_boundary(tmp_path, tok):
    prompt, completion = "hello wor", "ld"  # " world" is one token: not a prefix
    assert _ids(tok, prompt) != _ids(tok, prompt + completion)[: len(_ids(tok, prompt))]
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    (ex,) = load_calibration_data([str(path)], tok).examples
    expected = _ids(tok, prompt) + _ids(tok, completion, special=False)
    assert ex.input_ids == expected
    n_prompt = len(_ids(tok, prompt))
    assert ex.target_mask == (False,) * n_prompt + (True,) * (len(expected) - n_prompt)


def test_prompt_completion_with_eos_appending_tokenizer(tmp_path, tok_eos):
    prompt, completion = "question: what is two plus two? answer:", " four"
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    (ex,) = load_calibration_data([str(path)], tok_eos).examples
    assert ex.input_ids == _ids(tok_eos, prompt + completion)  # BOS ... EOS, natural
    assert ex.input_ids[-1] == tok_eos.eos_token_id
    n_prompt = 1 + len(_ids(tok_eos, prompt, special=False))
    assert ex.target_mask == (False,) * n_prompt + (True,) * (len(ex.input_ids) - n_prompt)
    assert _targets(tok_eos, ex) == " four</s>"

    # truncation keeps the added BOS/EOS, like the tokenizer's own truncation does
    long = " four, the quick brown fox"
    path = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "completion": long}])
    (short,) = load_calibration_data([str(path)], tok_eos, max_length=n_prompt + 3).examples
    truncated = tok_eos(prompt + long, truncation=True, max_length=n_prompt + 3)["input_ids"]
    assert short.input_ids == tuple(truncated)
    assert truncated[0] == tok_eos.bos_token_id and truncated[-1] == tok_eos.eos_token_id
    assert short.target_mask == (False,) * n_prompt + (True,) * 3


def test_conversational_prompt_completion(tmp_path, tok):
    rec = {
        "prompt": [{"role": "user", "content": "two plus two?"}],
        "completion": [{"role": "assistant", "content": "four"}],
    }
    path = _write_jsonl(tmp_path / "pc.jsonl", [rec])
    (ex,) = load_calibration_data([str(path)], tok).examples
    assert _targets(tok, ex) == "four<|im_end|>"


def test_messages_targets_are_assistant_turns(tmp_path, tok):
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "text": "ignored"}])
    (ex,) = load_calibration_data([str(path)], tok).examples
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == _ids(tok, rendered, special=False)
    assert ex.input_ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    # token by token: exactly the assistant contents with their end-of-turn are targets
    spans = []
    for k in (2, 4):
        before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: k + 1], tokenize=False)
        spans.append((len(_ids(tok, before, False)), len(_ids(tok, upto, False))))
    # ... less the newline the template writes after <|im_end|>, which generation never makes
    spans = [(a, b - 1) for a, b in spans]
    expected = tuple(any(a <= t < b for a, b in spans) for t in range(len(ex.input_ids)))
    assert ex.target_mask == expected
    assert _targets(tok, ex) == "hello world<|im_end|>four<|im_end|>"

    (cut,) = load_calibration_data([str(path)], tok, max_length=spans[0][0] + 2).examples
    assert cut.input_ids == ex.input_ids[: spans[0][0] + 2]
    assert cut.target_mask == ex.target_mask[: spans[0][0] + 2]


# Public chat templates (tool-call branches left out), with each family's end-of-turn token.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content']"
    " + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages "
    "%}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + message.content"
    " + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {
    "smollm2": (CHATML, (), "<|im_end|>"),
    "llama3": (LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "qwen2": (QWEN2, (), "<|im_end|>"),
    "gemma": (GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    "phi3": (PHI3, ("<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    "mistral": (MISTRAL, (), "</s>"),
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_chat_targets_end_at_end_of_turn(tmp_path, family):
    """Each assistant turn's targets are its content and end-of-turn token, nothing after."""
    template, specials, eot = TEMPLATES[family]
    tok = _make_tokenizer(template=template, extra_specials=specials)
    messages = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,) = load_calibration_data([str(path)], tok).examples
    assert ex.input_ids == _ids(tok, tok.apply_chat_template(messages, tokenize=False), False)
    assert _targets(tok, ex) == f"hello world{eot}four{eot}"
    mask = (*ex.target_mask, False)
    ends = [t for t in range(len(ex.input_ids)) if mask[t] and not mask[t + 1]]
    assert [ex.input_ids[t] for t in ends] == [tok.convert_tokens_to_ids(eot)] * 2


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from mergekit_fisher.real import smollm2

    try:
        gguf = smollm2.gguf_path()
    except smollm2.ModelUnavailable as error:
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_real_smollm2_chat_targets(tmp_path, smollm2_tokenizer):
    """The real SmolLM2 tokenizer (GGUF): the newline after <|im_end|> is not a target."""
    messages = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "4"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (ex,) = load_calibration_data([str(path)], smollm2_tokenizer).examples
    assert _targets(smollm2_tokenizer, ex) == "4<|im_end|>"
    assert smollm2_tokenizer.decode(ex.input_ids[-1:]) == "\n" and not ex.target_mask[-1]


def test_messages_with_unlocatable_turns_target_everything(tmp_path, caplog):
    tok = _make_tokenizer()
    # a template that renders earlier turns differently from the last: prefixes do not match
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
        "{{ m['content'] }} {% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 2)
    with caplog.at_level(logging.WARNING, logger="mergekit_fisher.data"):
        data = load_calibration_data([str(path)], tok)
    ex = data.examples[0]
    assert ex.target_mask == (False,) + (True,) * (len(ex.input_ids) - 1)
    warnings = [r for r in caplog.records if "assistant turns" in r.getMessage()]
    assert len(warnings) == 1  # once, not per example


def test_messages_without_assistant_turn_are_dropped(tmp_path, tok, caplog):
    recs = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", recs)
    with caplog.at_level(logging.WARNING, logger="mergekit_fisher.data"):
        data = load_calibration_data([str(path)], tok)
    assert len(data.examples) == 1
    assert "dropped 1 of 2" in caplog.text


def test_messages_without_chat_template(tmp_path):
    tok = _make_tokenizer()
    tok.chat_template = None
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: cannot apply the tokenizer's chat"):
        load_calibration_data([str(path)], tok)


def test_malformed_messages(tmp_path, tok):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: 'messages' must be"):
        load_calibration_data([str(path)], tok)


def test_field_priority(tmp_path, tok):
    rec = {"prompt": "question:", "completion": " four", "text": "hello world"}
    path = _write_jsonl(tmp_path / "d.jsonl", [rec])
    (ex,) = load_calibration_data([str(path)], tok).examples
    assert _targets(tok, ex) == " four"


# ------------------------------------------------------------- truncation, sampling, packing


def test_truncation_to_max_length(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text(CORPUS[0] + "\n")
    (ex,) = load_calibration_data([str(path)], tok, max_length=5).examples
    assert ex.input_ids == _ids(tok, CORPUS[0])[:5]
    assert ex.target_mask == (False, True, True, True, True)


def test_num_samples_takes_a_round_robin_mixture_of_sources(tmp_path, tok):
    a = tmp_path / "a.txt"
    a.write_text("one\ntwo\n")
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "three"}, {"text": "four"}])
    data = load_calibration_data([str(a), str(b)], tok, num_samples=3)
    assert [e.input_ids for e in data.examples] == [_ids(tok, t) for t in ("one", "three", "two")]
    more = load_calibration_data([str(a), str(b)], tok, num_samples=10)
    assert len(more.examples) == 4


def test_num_samples_counts_kept_examples(tmp_path, tok):
    recs = [{"prompt": CORPUS[0], "completion": " x"}, {"text": "hello"}, {"text": "world"}]
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    data = load_calibration_data([str(path)], tok, max_length=4, num_samples=2)
    assert [e.input_ids for e in data.examples] == [_ids(tok, "hello"), _ids(tok, "world")]


def test_pack(tmp_path, tok):
    texts = ["hello world", "the quick brown fox", "lazy dog"]
    path = tmp_path / "d.txt"
    path.write_text("\n".join(texts) + "\n")
    data = load_calibration_data([str(path)], tok, max_length=6, pack=True)
    eos = tok.eos_token_id
    stream = [*_ids(tok, texts[0]), eos, *_ids(tok, texts[1]), eos, *_ids(tok, texts[2])]
    chunks = [tuple(stream[i : i + 6]) for i in range(0, len(stream), 6)]
    if len(chunks[-1]) < 2:
        chunks.pop()
    assert [e.input_ids for e in data.examples] == chunks
    assert all(len(e.input_ids) == 6 for e in data.examples[:-1])
    for e in data.examples:
        assert e.target_mask == (False,) + (True,) * (len(e.input_ids) - 1)
    assert len(load_calibration_data([str(path)], tok, max_length=6, pack=True, num_samples=2)) == 2


def test_pack_refuses_prompt_completion_and_messages(tmp_path, tok):
    pc = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"pc\.jsonl:1: pack works only on plain-text"):
        load_calibration_data([str(pc)], tok, pack=True)
    chat = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="pack"):
        load_calibration_data([str(chat)], tok, pack=True)


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("hello world\nlazy dog\n")
    base = load_calibration_data([str(path)], tok, max_length=32).fingerprint
    assert len(base) == 64 and int(base, 16) >= 0
    assert load_calibration_data([str(path)], tok, max_length=32).fingerprint == base
    assert load_calibration_data([str(path)], _make_tokenizer(), max_length=32).fingerprint == base

    assert load_calibration_data([str(path)], tok, max_length=16).fingerprint != base
    assert load_calibration_data([str(path)], tok, max_length=32, pack=True).fingerprint != base
    assert load_calibration_data([str(path)], tok, max_length=32, num_samples=1).fingerprint != base
    assert (
        load_calibration_data([str(path)], tok, max_length=32, text_field="body").fingerprint
        != base
    )
    bigger = _make_tokenizer()
    bigger.add_tokens(["<extra>"])
    assert len(bigger) == len(tok) + 1
    assert load_calibration_data([str(path)], bigger, max_length=32).fingerprint != base

    path.write_text("hello world\nlazy cat\n")
    assert load_calibration_data([str(path)], tok, max_length=32).fingerprint != base


def test_fingerprint_of_datasets_follows_their_fingerprint(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "hello world"}]).save_to_disk(str(tmp_path / "a"))
    datasets.Dataset.from_list([{"text": "hello there"}]).save_to_disk(str(tmp_path / "b"))
    fa = load_calibration_data([str(tmp_path / "a")], tok).fingerprint
    assert load_calibration_data([str(tmp_path / "a")], tok).fingerprint == fa
    # same source name, different content
    (tmp_path / "a").rename(tmp_path / "old")
    (tmp_path / "b").rename(tmp_path / "a")
    assert load_calibration_data([str(tmp_path / "a")], tok).fingerprint != fa


# ----------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_calibration_data([str(missing)], tok)


def test_missing_later_source_fails_before_any_work(tmp_path, tok):
    a = tmp_path / "a.txt"
    a.write_text("hello\n")
    with pytest.raises(DataError, match="file not found"):
        load_calibration_data([str(a), str(tmp_path / "typo.txt")], tok, num_samples=1)


def test_unsupported_suffix(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_calibration_data([str(path)], tok)


def test_bad_json_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON") as e:
        load_calibration_data([str(path)], tok)
    assert "\n" not in str(e.value)


def test_bad_json_array(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        load_calibration_data([str(path)], tok)


def test_json_line_not_an_object(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('"just a string"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        load_calibration_data([str(path)], tok)


def test_not_utf8(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_bytes(b"hello \xff\xfe world\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_calibration_data([str(path)], tok)


def test_missing_field(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "no text"}])
    with pytest.raises(DataError) as e:
        load_calibration_data([str(path)], tok)
    msg = str(e.value)
    assert "d.jsonl:2" in msg and "--text-field" in msg
    assert "'messages'" in msg and "'prompt'+'completion'" in msg and "'text'" in msg


def test_text_field_not_a_string(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' is int"):
        load_calibration_data([str(path)], tok)


def test_empty_data(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"^empty dataset: .*d\.txt"):
        load_calibration_data([str(path)], tok)
    empty_json = tmp_path / "e.json"
    empty_json.write_text("[]")
    with pytest.raises(DataError, match="empty dataset"):
        load_calibration_data([str(empty_json)], tok)


def test_all_examples_masked(tmp_path, tok, caplog):
    recs = [{"prompt": CORPUS[0], "completion": " four"}] * 3
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    with (
        caplog.at_level(logging.WARNING, logger="mergekit_fisher.data"),
        pytest.raises(DataError, match=r"^no example has a target token: all 3 examples"),
    ):
        load_calibration_data([str(path)], tok, max_length=8)
    assert "dropped 3 of 3" in caplog.text


def test_bad_arguments(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="max_length"):
        load_calibration_data([str(path)], tok, max_length=1)
    with pytest.raises(DataError, match="num_samples"):
        load_calibration_data([str(path)], tok, num_samples=0)
    with pytest.raises(DataError, match="no calibration data"):
        load_calibration_data([], tok)


def test_example_invariants():
    with pytest.raises(ValueError):
        Example((1, 2), (False,))
    with pytest.raises(ValueError):
        Example((1, 2), (True, True))
    assert Example((1, 2, 3), (False, True, False)).num_targets == 1
