"""The mutation run's own upkeep: every mutant in tools/mutate.py still names code that exists.

A refactor that rewrites a mutated line turns its mutant `stale` (skipped, reported only by `make mutate`,
which CI does not run), so the bug it stands for silently stops being checked. This fast test fails
instead, naming the mutant to update.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
