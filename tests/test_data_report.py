"""The data report at pre-flight (training/data_report.py): what the train split looks like to the model, before
a GPU is paid for, in the job document, printed by --validate (which trains nothing and leaves nothing behind),
and drawn beside the training curve in the export folder (tests/test_main.py's whole job checks those two). The
figures are checked against counts made here with the tokenizer and numpy, not against the job's own code."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request

MAX_LENGTH = 48


def rows_with_long_ones(local_dir) -> list[dict]:
    """The demo's train rows, and two more: one whose prompt runs past max_length with its answer (cut there,
    still trained on), one whose answer starts beyond it (left out)."""
    folder = local_dir / "gemma-dataset-bucket" / "processed_datasets" / "tiny-animals"
    rows = pq.read_table(folder / "train.parquet").to_pylist()
    long_prompt = [{"role": "user", "content": "Which noise? " + "moo " * 8},
                   {"role": "assistant", "content": "The cow says moo. " * 6}]
    beyond = [{"role": "user", "content": "moo " * 80}, {"role": "assistant", "content": "The cow says moo."}]
    rows = rows + [{"messages": long_prompt}, {"messages": beyond}]
    out = folder.with_name("long-rows")
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    pq.write_table(pq.read_table(folder / "test.parquet"), out / "test.parquet")
    return rows


def expected(rows, tokenizer) -> tuple[list[int], list[int]]:
    """Each kept row's prompt (the generation prompt) and answer (its text and end of turn) tokens, as the
    model reads them within max_length."""
    prompts, answers = [], []
    for row in rows:
        conv = row["messages"]
        prompt = len(tokenizer(tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
        answer = len(tokenizer(conv[-1]["content"] + "<end_of_turn>\n", add_special_tokens=False)["input_ids"])
        if prompt >= MAX_LENGTH:
            continue  # nothing of the answer within max_length: left out
        prompts.append(prompt)
        answers.append(min(answer, MAX_LENGTH - prompt))
    return prompts, answers


def test_validate_prints_and_records_the_report_and_trains_nothing(local_dir, tiny_root, capsys):
    from training.data import load_tokenizer

    rows = rows_with_long_ones(local_dir)
    req = sample_request(tiny_root)
    req["processed_dataset_id"] = "long-rows"
    req["training_config"]["hyperparameters"]["max_length"] = MAX_LENGTH
    put_request(local_dir, "report", req)
    assert main.main(["--validate"], env_for(local_dir, "report")) == 0
    out = capsys.readouterr().out
    tokenizer = load_tokenizer(str(tiny_root / "models" / "tiny-gemma3"), None, False)
    prompts, answers = expected(rows, tokenizer)
    assert len(prompts) == len(rows) - 1
    lines = out.splitlines()
    start = lines.index("request and dataset are valid")
    assert lines[start + 1] == f"train rows kept: {len(prompts)} (max_length {MAX_LENGTH}; cut at max_length: 1, " \
                               f"{1 / len(rows):.1%})"
    assert lines[start + 2] == "prompt tokens: " + ", ".join(
        f"{k} {v:g}" for k, v in (("p50", np.percentile(prompts, 50)), ("p90", np.percentile(prompts, 90)),
                                  ("p99", np.percentile(prompts, 99)), ("mean", round(float(np.mean(prompts)), 1)),
                                  ("max", max(prompts))))
    assert lines[start + 3].startswith(f"answer tokens: p50 {np.percentile(answers, 50):g}, ")
    assert lines[start + 3].endswith(f"max {max(answers)}")
    assert lines[start + 4] == "left out (no trained token within max length): 1"
    first = rows[0]["messages"]
    assert f"⟦{first[-1]['content']}<end_of_turn>\n⟧" in out and f"{first[1]['content']}<end_of_turn>" in out
    # --validate records nothing: no document, no export, no work folder
    assert not (local_dir / "firestore" / "training_jobs" / "report.json").exists()
    assert not (local_dir / "gemma-export-bucket").exists()


def test_preference_rows_report_their_prompts_against_max_prompt_length(tiny_root):
    """DPO, ORPO and GRPO: TRL tokenizes the completions, so the report gives the prompts, against the budget
    rows are left out at."""
    from training.data import fit_prompts, load_tokenizer
    from training.data_report import as_text, data_report

    tokenizer = load_tokenizer(str(tiny_root / "models" / "tiny-gemma3"), None, False)
    table = pq.read_table(tiny_root / "gemma-dataset-bucket" / "processed_datasets" / "tiny-animals-pref" /
                          "train.parquet").to_pylist()
    counts = [len(tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]) for r in table]
    budget = sorted(counts)[len(counts) // 2]  # about half the prompts fit
    fitted = fit_prompts(table, tokenizer, budget)
    report, _ = data_report(fitted, tokenizer, budget, {"prompt_beyond_max_prompt_length": fitted.dropped},
                            fitted.prompt_lengths, "max_prompt_length")
    kept = [n for n in counts if n <= budget]
    assert report["rows"] == len(kept) and report["prompt_tokens"]["max"] == max(kept)
    assert report["prompt_tokens"]["p50"] == np.percentile(kept, 50) and report["answer_tokens"] is None
    assert report["left_out"] == {"prompt_beyond_max_prompt_length": len(counts) - len(kept)}
    assert "first_row" not in report and f"(max_prompt_length {budget};" in as_text(report)
