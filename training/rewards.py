"""Reward functions for GRPO, built from the request's `reward_config` graders.

Each is TRL's signature `fn(completions, **kwargs) -> list[float]`: `completions` are strings or
message lists, and the dataset's other columns (the reference fields) arrive as keyword lists,
one value per completion. Every score is in [0, 1]. Nothing from a request is ever executed:
"expressions" are read by a small arithmetic evaluator over Python's AST, not by eval().

    string_check     eq | ne | like (contains) | ilike (contains, any case), against reference_field
    text_similarity  fuzzy_match | bleu | gleu | rouge_1..rouge_5 | rouge_l, against reference_field
    built_in         format_reward | count_xml | expression_accuracy | numerical_accuracy
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
from collections.abc import Callable
from typing import Any

from schema import Grader

RewardFn = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's content in a message list."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    if isinstance(completion, list):  # typed parts
        completion = "".join(p.get("text", "") for p in completion if isinstance(p, dict))
    return str(completion)


def extract_answer(text: str, tag: str) -> str:
    """The last <tag>...</tag> block, or the whole text when there is none."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return (found[-1] if found else text).strip()


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".").strip().lower()


# ---- built-in functions -------------------------------------------------------------------------

def format_score(text: str, think: str, answer: str) -> float:
    pattern = rf"\s*<{think}>.*?</{think}>\s*<{answer}>.*?</{answer}>\s*"
    return 1.0 if re.fullmatch(pattern, text, flags=re.DOTALL) else 0.0


def count_xml_score(text: str, think: str, answer: str) -> float:
    """0.25 for each of the four tags present exactly once, less 0.001 per character after </answer>."""
    score = sum(0.25 for tag in (f"<{think}>", f"</{think}>", f"<{answer}>", f"</{answer}>") if text.count(tag) == 1)
    closing = f"</{answer}>"
    if closing in text:
        score -= 0.001 * len(text.split(closing, 1)[1].strip())
    return max(0.0, score)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(text: str) -> float | None:
    """The value of a plain arithmetic expression (numbers, + - * / ** and parentheses), else None."""
    text = text.replace(",", "").replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    if not text or len(text) > 200:
        return None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value,
                                                                                                       bool):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(value(node.right)) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def expression_score(answer: str, reference: Any) -> float:
    """1 when the answer equals the reference as text, or as the value of an arithmetic expression."""
    if normalise(answer) == normalise(reference):
        return 1.0
    a, b = arithmetic(answer), arithmetic(str(reference))
    return 1.0 if a is not None and b is not None and close(a, b) else 0.0


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def first_number(text: str) -> float | None:
    m = NUMBER.search(str(text))
    return float(m[0].replace(",", "")) if m else None


def numerical_score(answer: str, reference: Any) -> float:
    a, b = first_number(answer), first_number(reference)
    return 1.0 if a is not None and b is not None and close(a, b) else 0.0


# ---- comparisons with a reference ---------------------------------------------------------------

def string_check(text: str, reference: Any, operation: str) -> float:
    text, reference = text.strip(), str(reference).strip()
    result = {"eq": text == reference, "ne": text != reference, "like": reference in text,
              "ilike": reference.lower() in text.lower()}[operation]
    return 1.0 if result else 0.0


def similarity(text: str, reference: Any, metric: str) -> float:
    reference = str(reference)
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, normalise(text), normalise(reference)).ratio()
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric.startswith("rouge_"):
        from rouge_score import rouge_scorer

        name = "rougeL" if metric == "rouge_l" else "rouge" + metric.rsplit("_", 1)[1]
        return float(rouge_scorer.RougeScorer([name]).score(reference, text)[name].fmeasure)
    raise ValueError(f"unsupported evaluation_metric {metric!r}")


def build_reward(grader: Grader) -> RewardFn:
    """The grader as a TRL reward function named after it (TRL logs rewards/<name>/mean)."""
    params = {"think": grader.parameters.think_tag, "answer": grader.parameters.answer_tag}
    ref_field = grader.reference_column

    def references(kwargs: dict[str, Any], n: int) -> list[Any]:
        if ref_field not in kwargs:
            raise KeyError(f"grader '{grader.name}': the dataset has no column '{ref_field}' (reference_field)")
        return list(kwargs[ref_field])[:n]

    def score(completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        if grader.type == "built_in" and grader.function_name == "format_reward":
            return [format_score(t, **params) for t in texts]
        if grader.type == "built_in" and grader.function_name == "count_xml":
            return [count_xml_score(t, **params) for t in texts]
        refs = references(kwargs, len(texts))
        if grader.type == "built_in":
            fn = expression_score if grader.function_name == "expression_accuracy" else numerical_score
            return [fn(extract_answer(t, params["answer"]), r) for t, r in zip(texts, refs)]
        if grader.type == "string_check":
            return [string_check(t, r, grader.operation) for t, r in zip(texts, refs)]
        return [similarity(t, r, grader.evaluation_metric) for t, r in zip(texts, refs)]

    score.__name__ = re.sub(r"\W", "_", grader.name)
    return score


def reference_fields(graders: list[Grader]) -> set[str]:
    """The dataset columns the graders read."""
    return {g.reference_column for g in graders if g.reference_column}
