"""The reward functions the request's graders build, on literal cases."""

from __future__ import annotations

import pytest

from schema import Grader
from training.rewards import (
    arithmetic,
    build_reward,
    completion_text,
    count_xml_score,
    expression_score,
    extract_answer,
    first_number,
    format_score,
    numerical_score,
    reference_fields,
    similarity,
    string_check,
)

GOOD = "<think>2 and 2</think>\n<answer>4</answer>"


def grader(**kw) -> Grader:
    return Grader.model_validate({"name": "g", **kw})


def test_completion_text_and_answer_extraction():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "last"}]) == "last"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "parts"}]}]) == "parts"
    assert extract_answer(GOOD, "answer") == "4"
    assert extract_answer("<answer>1</answer> then <answer> 7 </answer>", "answer") == "7"
    assert extract_answer("no tags 12", "answer") == "no tags 12"
    assert extract_answer("<sol>x</sol>", "sol") == "x"


@pytest.mark.parametrize("text,score", [
    (GOOD, 1.0),
    ("  <think>a</think><answer>b</answer>  ", 1.0),
    ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
    ("<think>x</think>", 0.0),
    ("4", 0.0),
    ("<think>x</think><answer>4</answer> trailing", 0.0),
])
def test_format_reward(text, score):
    assert format_score(text, "think", "answer") == score


def test_format_reward_custom_tags():
    assert format_score("<r>x</r><a>y</a>", think="r", answer="a") == 1.0
    assert format_score(GOOD, think="r", answer="a") == 0.0


@pytest.mark.parametrize("text,score", [
    (GOOD, 1.0),
    ("<think>x</think>", 0.5),
    ("<think><think>x</think><answer>1</answer>", 0.75),  # <think> twice
    (GOOD + "abcde", 0.995),  # 5 characters after </answer>
    ("nothing", 0.0),
])
def test_count_xml(text, score):
    assert count_xml_score(text, "think", "answer") == pytest.approx(score)


def test_arithmetic_is_safe_and_exact():
    assert arithmetic("2*(3+4)") == 14.0
    assert arithmetic("2^10") == 1024.0
    assert arithmetic("1,000 / 8") == 125.0
    assert arithmetic("-3 + 1") == -2.0
    for never_run in ("__import__('os').system('true')", "open('x')", "(lambda: 1)()", "9**999999", "1/0", "a+1"):
        assert arithmetic(never_run) is None


@pytest.mark.parametrize("answer,reference,score", [
    ("14", "14", 1.0), ("2*7", "14", 1.0), ("x = 2", "X = 2.", 1.0), ("15", "14", 0.0), ("fourteen", "14", 0.0),
])
def test_expression_accuracy(answer, reference, score):
    assert expression_score(answer, reference) == score


@pytest.mark.parametrize("answer,reference,score", [
    ("The answer is 1,234.", "1234", 1.0), ("-0.5 apples", "-.5", 1.0), ("3.0", "3", 1.0),
    ("about 3.1", "3", 0.0), ("none", "3", 0.0), ("1e3", "1000", 1.0),
])
def test_numerical_accuracy(answer, reference, score):
    assert numerical_score(answer, reference) == score
    assert first_number("no digits") is None


@pytest.mark.parametrize("text,reference,op,score", [
    ("moo", " moo ", "eq", 1.0), ("Moo", "moo", "eq", 0.0), ("moo", "baa", "ne", 1.0), ("moo", "moo", "ne", 0.0),
    ("the cow says moo", "moo", "like", 1.0), ("The cow says MOO", "moo", "like", 0.0),
    ("The cow says MOO", "moo", "ilike", 1.0), ("baa", "moo", "ilike", 0.0),
])
def test_string_check(text, reference, op, score):
    assert string_check(text, reference, op) == score


def test_text_similarity():
    assert similarity("the cow says moo", "the cow says moo", "fuzzy_match") == 1.0
    assert similarity("The cow says moo.", "the cow says moo", "fuzzy_match") == 1.0  # case, final period
    assert similarity("abc", "xyz", "fuzzy_match") == 0.0
    assert similarity("the cat sat on the mat", "the cat sat on the mat", "bleu") == pytest.approx(1.0)
    assert similarity("dogs bark loudly", "the cat sat on the mat", "bleu") == 0.0
    assert similarity("the cat sat", "the cat sat on the mat", "rouge_1") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert similarity("cat the sat", "the cat sat", "rouge_l") == pytest.approx(2 / 3)
    assert similarity("the cat sat", "the cat sat", "rouge_5") == 0.0  # no 5-grams at all
    assert similarity("a b c d e f", "a b c d e f", "rouge_5") == 1.0
    assert similarity("the cat sat on the mat", "the cat sat on the mat", "gleu") == pytest.approx(1.0)


def test_build_reward_reads_reference_columns_and_message_completions():
    fn = build_reward(grader(type="string_check", reference_field="answer", operation="ilike"))
    assert fn.__name__ == "g"
    completions = [[{"role": "assistant", "content": "It says MOO"}], [{"role": "assistant", "content": "baa"}]]
    assert fn(completions, answer=["moo", "moo"], prompts=["p", "p"]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="no column 'answer'"):
        fn(completions, solution=["moo", "moo"])
    fmt = build_reward(grader(type="built_in", function_name="format_reward"))
    assert fmt([GOOD, "4"]) == [1.0, 0.0]
    num = build_reward(grader(type="built_in", function_name="numerical_accuracy", reference_field="sol"))
    assert num(["<think>.</think><answer>42 cows</answer>", "<answer>41</answer>"], sol=["42", "42"]) == [1.0, 0.0]
    sim = build_reward(grader(type="text_similarity", reference_field="answer", evaluation_metric="fuzzy_match"))
    assert sim(["moo"], answer=["moo"]) == [1.0]
    assert reference_fields([grader(type="built_in", function_name="count_xml"),
                             grader(type="built_in", function_name="expression_accuracy"),
                             grader(type="string_check", reference_field="label", operation="eq")]) == {"answer",
                                                                                                      "label"}


@pytest.mark.parametrize("spec,message", [
    ({"type": "python", "source": "import os"}, "would run code from the request"),
    ({"type": "score_model", "model": "gpt-4o", "prompt": "rate"}, "calls an outside model"),
    ({"type": "label_model", "model": "m", "labels": ["a"]}, "calls an outside model"),
    ({"type": "ruler", "model": "m", "rules": ["x"]}, "calls an outside model"),
    ({"type": "text_similarity", "reference_field": "a", "evaluation_metric": "cosine"}, "downloaded at run time"),
    ({"type": "string_check", "reference_field": "a"}, "needs operation"),
])
def test_unsafe_or_incomplete_graders_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        grader(**spec)
