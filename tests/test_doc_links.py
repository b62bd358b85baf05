"""
The Markdown documents' links within the repository lead somewhere: to a file that exists and, where the link
names an anchor (``PERFORMANCE.md#memory-per-key``), to a heading of that file.
"""

import glob
import os
import re

import pytest

from .harness import REPO

#: Inline links and images: ``[text](target)``, the target without a title.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _documents():
    found = []
    for pattern in ("*.md", "docs/*.md", "bench/**/*.md", "helm/**/*.md"):
        found.extend(glob.glob(os.path.join(REPO, pattern), recursive=True))
    return sorted(set(found))


def _lines_outside_code(path):
    inside = False
    with open(path, encoding="utf-8") as document:
        for line in document:
            if FENCE.match(line):
                inside = not inside
                continue
            if not inside:
                yield line


def slug(heading: str) -> str:
    """
    The anchor GitHub gives a heading: lower case, inline code and link markup dropped, punctuation other than
    ``-`` and ``_`` removed, each space a hyphen.
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    seen, found = {}, set()
    for line in _lines_outside_code(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        # GitHub numbers repeated headings: name, name-1, name-2...
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else "%s-%d" % (base, count))
    return found


def _links():
    for path in _documents():
        for line in _lines_outside_code(path):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                yield os.path.relpath(path, REPO), target


def test_slug_follows_github():
    """If a heading has code, punctuation and capitals, then its anchor is GitHub's."""
    assert slug("Tracing overhead (issue 4)") == "tracing-overhead-issue-4"
    assert slug("Run 9: the cluster write path") == "run-9-the-cluster-write-path"
    assert slug("`POST /bulk` and the 100-item limit") == "post-bulk-and-the-100-item-limit"


def test_documents_are_found():
    """If the documents moved, then this test would check nothing: the performance pages are among them."""
    names = {os.path.relpath(path, REPO) for path in _documents()}
    assert {"README.md", "docs/PERFORMANCE.md", "bench/results/HISTORY.md"} <= names


@pytest.mark.parametrize("source,target", sorted(set(_links())))
def test_link_resolves(source, target):
    """If a document links to a file of the repository (and an anchor in it), then both exist."""
    path, _, anchor = target.partition("#")
    resolved = os.path.join(REPO, source) if not path else os.path.normpath(
        os.path.join(REPO, os.path.dirname(source), path))
    assert os.path.exists(resolved), "%s links to %s, which does not exist" % (source, target)
    if anchor and resolved.endswith(".md"):
        assert anchor in anchors(resolved), "%s links to %s: no such heading in %s" % (
            source, target, os.path.relpath(resolved, REPO))
