"""The docs stay true (issue 40): the request's reference page is what its models generate, every field it lists
says what it does, the README fits on a screen and links pages that exist, and each command the docs show names
a make target, a file or a `gemma-job` subcommand that exists."""

from __future__ import annotations

import re

from conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_committed_reference_is_what_the_models_generate():
    from operating.reference import render

    committed = (ROOT / "docs" / "request-reference.md").read_text()
    assert committed == render(), "docs/request-reference.md is stale: gemma-job reference > docs/request-reference.md"


def test_every_request_field_says_what_it_does():
    from operating.reference import undocumented

    assert undocumented() == []


def test_the_reference_lists_every_field_with_its_default():
    import json

    from pydantic_core import to_jsonable_python

    from schema import ExportConfig, Hyperparameters

    page = (ROOT / "docs" / "request-reference.md").read_text()
    for model in (Hyperparameters, ExportConfig):
        for name, field in model.model_fields.items():
            row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
            if field.default_factory is None and not field.is_required():
                assert f"| `{json.dumps(to_jsonable_python(field.default))}` |" in row, row


def test_the_readme_fits_on_a_screen_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 70
    assert "make demo" in readme and "make test" in readme  # the two commands, first
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name} links {target}, which is not there"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    assert linked == {p.name for p in DOCS}  # every page is in the README's table


def test_every_command_the_docs_show_exists():
    from operating import cli

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *DOCS])
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for target in re.findall(r"(?:^|`|\s)make ([a-z][\w-]*)", text):
        assert target in targets, f"make {target}"
    for path in re.findall(r"\.venv/bin/python (?!-m )([\w/.-]+\.py)", text):
        assert (ROOT / path).is_file(), path
    for module in re.findall(r"python -m ([\w.]+)", text):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    commands = {"run", "reference", *re.findall(r'add_parser\("(\w+)"', (ROOT / "operating" / "cli.py").read_text())}
    shown = set(re.findall(r"gemma-job ([a-z]+)\b", text))
    assert shown and shown <= commands, shown - commands
    assert cli.main(["reference"]) == 0
