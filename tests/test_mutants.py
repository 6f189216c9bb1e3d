"""The mutation run's own upkeep: every mutant in tools/mutate.py still names code that exists.

A refactor that rewrites a mutated line turns its mutant `stale` (skipped, reported only by `make mutate`,
which CI does not run), so the bug it stands for silently stops being checked. This fast test fails
instead, naming the mutant to update.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mutate_module():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_snippet_occurs_exactly_once_and_its_tests_exist():
    mutate = _mutate_module()
    assert len(mutate.MUTANTS) >= 30
    stale = {}
    for m in mutate.MUTANTS:
        count = (ROOT / m.path).read_text().count(m.original)
        if count != 1:
            stale[m.name] = count
        assert m.mutated != m.original, m.name
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).exists(), (m.name, test)
    assert stale == {}, f"snippets found a number of times other than once: {stale}"
    assert len({m.name for m in mutate.MUTANTS}) == len(mutate.MUTANTS)  # --only picks by name


def test_only_a_failing_test_catches_a_mutant(tmp_path):
    """A mutant counts as caught only when pytest ran the tests and one failed; a timeout, a collection
    error (pytest's own crash) or no tests at all are reported as such, never as caught."""
    mutate = _mutate_module()
    assert [mutate.verdict(c) for c in (0, 1, 2, 3, 4, 5, -9, mutate.TIMED_OUT)] == [
        "survived", "caught", "crashed", "crashed", "crashed", "crashed", "crashed", "timed out",
    ]  # fmt: skip


@pytest.mark.slow
def test_pytest_exit_status_tells_a_failing_test_from_a_broken_run(tmp_path):
    """The statuses above, as _pytest gets them from pytest: an error a test meets is a failure (caught),
    an import that breaks collection is not."""
    mutate = _mutate_module()
    (tmp_path / "test_raises.py").write_text("def test_it():\n    raise ValueError('the mutant')\n")
    (tmp_path / "test_broken.py").write_text("import no_such_module_anywhere\n\ndef test_it():\n    pass\n")
    found = {
        name: mutate.verdict(mutate._pytest(tmp_path, [f"{name}.py"])[0])
        for name in ("test_raises", "test_broken")
    }
    assert found == {"test_raises": "caught", "test_broken": "crashed"}
