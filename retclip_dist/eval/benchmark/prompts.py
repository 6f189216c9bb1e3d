"""Zero-shot prompt packs: per task, templates and class phrases in English and Chinese.

A pack is YAML: ``templates: {en: [...], zh: [...]}`` (each with one ``{}``) and ``classes: {name:
{en: [phrases], zh: [phrases]}}``. A class embedding is the mean over the templates x phrases of one
language; the benchmark also scores every single template, since prompt wording alone moves zero-shot
results a lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from retclip_dist.eval.benchmark.suite import DatasetSpec

LANGUAGES = ("en", "zh")
PACK_DIR = Path(__file__).resolve().parents[3] / "configs" / "prompts"
# The pack each layout (and task option) uses when a dataset names none.
DEFAULT_PACKS = {
    ("aptos2019", "dr"): "dr_grade.yaml",
    ("idrid", "dr"): "dr_grade.yaml",
    ("idrid", "dme"): "dme_idrid.yaml",
    ("messidor2", "dr"): "dr_grade.yaml",
    ("messidor2", "dme"): "dme_messidor2.yaml",
    ("rfmid", "dr"): "rfmid.yaml",
    ("odir5k", "dr"): "odir5k.yaml",
}


@dataclass(frozen=True)
class PromptPack:
    path: str  # where it was read from
    templates: dict[str, list[str]]  # language -> templates with one "{}"
    phrases: dict[str, dict[str, list[str]]]  # class -> language -> phrases

    def prompts(self, language: str, classes: list[str], template: str | None = None) -> dict[str, list[str]]:
        """class -> prompts of ``language`` (all its templates, or only ``template``)."""
        templates = [template] if template is not None else self.templates[language]
        missing = [c for c in classes if c not in self.phrases]
        if missing:
            raise ValueError(f"prompt pack {self.path}: no phrases for classes {missing}")
        return {c: [t.format(p) for t in templates for p in self.phrases[c][language]] for c in classes}


def pack_path(spec: DatasetSpec) -> str:
    """The dataset's pack: its own ``prompts``, else its layout's default; an error when there is none."""
    if spec.prompts:
        return spec.prompts
    task = str(spec.options.get("task", "dr"))
    name = DEFAULT_PACKS.get((spec.layout, task))
    if name is None:
        raise ValueError(
            f"dataset {spec.name}: zero_shot needs a prompt pack for layout {spec.layout}; set its prompts: "
            f"(packs in {PACK_DIR})"
        )
    return str(PACK_DIR / name)


def load_pack(path: str) -> PromptPack:
    """Read and check a pack: both languages, a '{}' in every template, phrases per class and language."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read prompt pack {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise ValueError(f"prompt pack {path}: needs 'templates: {{en: [...], zh: [...]}}'")
    if not isinstance(data.get("classes"), dict) or not data["classes"]:
        raise ValueError(f"prompt pack {path}: needs a non-empty 'classes' mapping")
    templates = {}
    for lang in LANGUAGES:
        items = data["templates"].get(lang)
        if not items or not all(isinstance(t, str) and t.count("{}") == 1 for t in items):
            raise ValueError(f"prompt pack {path}: templates.{lang} must list templates with one '{{}}'")
        templates[lang] = list(items)
    phrases: dict[str, dict[str, list[str]]] = {}
    for name, per_lang in data["classes"].items():
        if not isinstance(per_lang, dict):
            raise ValueError(f"prompt pack {path}: classes.{name} must map en/zh to phrases")
        phrases[str(name)] = {}
        for lang in LANGUAGES:
            items = per_lang.get(lang)
            if not items or not all(isinstance(p, str) and p.strip() for p in items):
                raise ValueError(f"prompt pack {path}: classes.{name}.{lang} needs non-empty phrases")
            phrases[str(name)][lang] = list(items)
    return PromptPack(str(path), templates, phrases)
