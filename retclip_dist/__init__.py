"""retclip-dist: distributed pretraining of RET-CLIP on colour fundus photographs and reports."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # retclip_dist.load (api.py) imports torch, timm and transformers: only when used, so that the tools
    # importing a submodule (make-shards, the launchers) start as quickly as before.
    if name == "load":
        from retclip_dist.api import load

        return load
    raise AttributeError(f"module 'retclip_dist' has no attribute {name!r}")
