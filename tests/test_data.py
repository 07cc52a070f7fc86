"""Row forms, conversation checks, assistant-only labels and truncation, on the tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from training.data import DatasetError, check_rows, row_form, split_uris, to_conversation, tokenize


@pytest.fixture(scope="module")
def tok(tiny_root):
    return AutoTokenizer.from_pretrained(str(tiny_root / "models" / "tiny-gemma3"))


CONV = [{"role": "user", "content": "What does the cow say?"}, {"role": "assistant", "content": "The cow says moo."}]


def test_row_forms():
    assert row_form(["messages", "id"], "sft") == ("messages",)
    assert row_form(["text"], "sft") == ("text",)
    assert row_form(["prompt", "completion"], "sft") == ("prompt", "completion")
    with pytest.raises(DatasetError, match=r"columns \['answer', 'question'\] do not fit trainer_type 'sft'"):
        row_form(["question", "answer"], "sft")
    with pytest.raises(DatasetError, match="needs prompt\\+chosen\\+rejected"):
        row_form(["prompt", "chosen"], "dpo")


def test_typed_parts_and_prompt_completion_become_messages():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": "Hello"}]}
    assert to_conversation(parts, ("messages",))[0] == {"role": "user", "content": "Hi there"}
    pc = to_conversation({"prompt": "2+2?", "completion": "4"}, ("prompt", "completion"))
    assert pc == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "roles out of order"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "empty content"),
    ([{"role": "user", "content": "x"}], "does not end with an assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}], "role 'tool'"),
    ([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}], "image part"),
])
def test_invalid_conversations_are_named(messages, match):
    with pytest.raises(DatasetError, match=f"1 of 2 train rows.*row 1: .*{match}"):
        check_rows([{"messages": CONV}, {"messages": messages}], ("messages",), "train")


def test_tool_calling_rows_are_refused_not_trained_without_their_tools():
    """Rows with tool definitions or calls: the job would train them as plain turns, so it refuses them by row."""
    call = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    with pytest.raises(DatasetError, match=r"1 of 2 train rows.*row 1: tool_calls in a turn: this job does not train "
                                           r"tool-calling conversations yet"):
        check_rows([{"messages": CONV}, {"messages": [CONV[0], call]}], ("messages",), "train")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with pytest.raises(DatasetError, match=r"row 0: a tools column: this job does not train tool-calling"):
        check_rows([{"messages": CONV, "tools": tools}, {"messages": CONV, "tools": None}], ("messages",), "train")
    assert check_rows([{"messages": CONV, "tools": None}, {"messages": CONV, "tools": []}], ("messages",), "train")


def test_empty_split():
    with pytest.raises(DatasetError, match="the test split is empty"):
        check_rows([], ("messages",), "test")


def test_assistant_only_labels(tok):
    out = tokenize([[{"role": "system", "content": "Be brief."}] + CONV], tok, 512, assistant_only=True)
    row = out.rows[0]
    trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tok.decode(trained) == "The cow says moo.<end_of_turn>\n"
    everything = tokenize([CONV], tok, 512, assistant_only=False).rows[0]
    assert everything["labels"] == everything["input_ids"]


def test_truncation_is_counted_and_rows_without_labels_dropped(tok):
    long = [{"role": "user", "content": "moo " * 200}, {"role": "assistant", "content": "ok"}]
    out = tokenize([CONV, long], tok, 32, assistant_only=True)
    assert (len(out.rows), out.truncated, out.dropped) == (1, 1, 1)
    assert all(len(r["input_ids"]) <= 32 for r in out.rows)


def test_split_uris():
    p = "gs://b/processed_datasets/d/"
    assert split_uris([p + "train.parquet", p + "validation.parquet"], p) == {
        "train": p + "train.parquet", "eval": p + "validation.parquet"}
    assert split_uris([p + "train.parquet"], p) == {"train": p + "train.parquet"}
    with pytest.raises(DatasetError, match=r"looked for gs://b/processed_datasets/d/train.parquet and found nothing "
                                           r"\(no processed_datasets metadata document either\)"):
        split_uris([], p)


def test_split_uris_from_metadata():
    p = "gs://b/processed_datasets/d/"
    meta = {"splits": [{"split_name": "train", "num_rows": 9, "path": "gs://other/x/train-00.parquet"},
                       {"split_name": "eval", "num_rows": 2, "path": "processed_datasets/d/ev.parquet"}]}
    # the metadata wins over the listing
    assert split_uris([p + "train.parquet"], p, meta) == {"train": "gs://other/x/train-00.parquet",
                                                          "eval": "gs://b/processed_datasets/d/ev.parquet"}
    assert split_uris([], p, {"splits": [{"split_name": "train", "path": "t.parquet"}]}) == {"train": p + "t.parquet"}
    assert split_uris([p + "train.parquet"], p, {"modality": "text"}) == {"train": p + "train.parquet"}
    with pytest.raises(DatasetError, match=r"looked for the metadata's splits and found \['test'\]"):
        split_uris([], p, {"splits": [{"split_name": "test", "path": "x.parquet"}]})
    with pytest.raises(DatasetError, match=r"split 'train' has path 'gs://b/../../x'"):
        split_uris([], p, {"splits": [{"split_name": "train", "path": "../../x"}]})


@pytest.mark.parametrize("assistant_only", [True, False])
def test_tokenising_in_processes_gives_the_serial_rows_in_order(tok, assistant_only):
    """datasets.map(num_proc=2) over rows sent as JSON: the same ids, labels, order and counts as one
    process, for conversations, plain text, a truncated row and a row left with nothing to train."""
    long = [{"role": "user", "content": "moo " * 200}, {"role": "assistant", "content": "ok"}]
    rows = [[{"role": "system", "content": f"Be brief {i}."}] + CONV if i % 3 else f"text row {i}" if i % 2 else
            [{"role": "user", "content": f"animal {i}?"}, {"role": "assistant", "content": "baa " * (i % 7 + 1)}]
            for i in range(300)] + [long, CONV]
    serial = tokenize(rows, tok, 32, assistant_only, workers=1)
    parallel = tokenize(rows, tok, 32, assistant_only, workers=2)
    assert parallel.rows == serial.rows and len(serial.rows) >= 250
    assert (parallel.truncated, parallel.dropped, parallel.tokens, parallel.trained_tokens) == \
        (serial.truncated, serial.dropped, serial.tokens, serial.trained_tokens)
    assert serial.truncated >= 1 and serial.dropped == (1 if assistant_only else 0)
