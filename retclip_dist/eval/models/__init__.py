"""Models ``retclip-eval benchmark`` compares: one adapter per family (base.py says what an adapter
provides, registry.py lists them)."""
