"""The documents point only at files the repository ships (issue 11 item 9)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/MODEL.md", "xoron/demo/TRAINING.md", "benchmarks/RESULTS.md"]
# a repository path: a known top-level folder, then path characters, ending in a file name
PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|csrc|docs|tests|tools|xoron)/[\w./*-]*[\w*])")
BUILT = (".so",)  # build outputs the documents may name: compiled modules, globs over them
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def _referenced(doc: str):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    refs = {r for r in PATH.findall(text) if "*" not in r and not r.endswith(BUILT)}
    refs |= {os.path.normpath(os.path.join(os.path.dirname(doc), link)) for link in LINK.findall(text)
             if "://" not in link}
    return sorted(refs)


@pytest.mark.parametrize("doc", [d for d in DOCS if os.path.exists(os.path.join(ROOT, d))])
def test_documents_name_only_shipped_files(doc):
    missing = [r for r in _referenced(doc) if not os.path.exists(os.path.join(ROOT, r))]
    assert not missing, f"{doc} points at files the repository does not ship: {missing}"


def test_readme_links_the_model_document_not_the_shared_spec():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "docs/MODEL.md" in text and "SPEC.md" not in text
