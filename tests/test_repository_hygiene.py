"""The repository's own files name no folder of the machine that wrote them and no document it does not contain."""

import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

# Folders that exist only on some machine: home and work directories, and the development machines' data folder.
MACHINE_PATH = re.compile(r"/work/|/root/|/home/|\.\./shared")
# Design notes and section numbers of documents that are not part of the repository.
MISSING_DOCUMENT = re.compile(r"\bDESIGN\b|§")
# Development shorthand that means nothing to a user.
JARGON = re.compile(r"\bmain[ _-]job\b", re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s${}]+)\)")  # local links, not templates


def tracked_text_files() -> dict[str, str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    files = {}
    for name in names.splitlines():
        path = REPO_ROOT / name
        # The fixtures (what an old version saved) are checked too: their comments may change, their code may not.
        if name == "tests/test_repository_hygiene.py" or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # text, not an image or weights
            files[name] = data.decode("utf-8", errors="replace")
    return files


def findings(pattern: re.Pattern, files: dict[str, str]) -> list[str]:
    return [
        f"{name}:{number}: {line.strip()[:120]}"
        for name, text in files.items()
        for number, line in enumerate(text.splitlines(), start=1)
        if pattern.search(line)
    ]


def test_no_tracked_file_names_a_machine_path():
    assert findings(MACHINE_PATH, tracked_text_files()) == []


def test_no_tracked_file_uses_development_jargon():
    assert findings(JARGON, tracked_text_files()) == []


def test_no_tracked_file_refers_to_a_missing_document():
    files = tracked_text_files()
    problems = findings(MISSING_DOCUMENT, files)
    for name, text in files.items():
        if not name.endswith(".md"):
            continue
        for target in MARKDOWN_LINK.findall(text):
            if not (REPO_ROOT / name).parent.joinpath(target.split("#")[0]).exists():
                problems.append(f"{name}: link to missing {target}")
    assert problems == []
