"""gradauth: sell one trained network at several accuracy tiers (graded authorization by structured pruning)."""
__version__ = "0.1.0"

_API = {"unlock": "release", "unlock_to_file": "release",
        "register_importance": "registry", "register_dataset": "registry", "register_model": "registry",
        "load_plugins": "registry", "setting": "rules"}
__all__ = list(_API)


def __getattr__(name: str):
    # Lazy (PEP 562): `import gradauth` stays light (no torch) until a caller asks for the API.
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'gradauth' has no attribute {name!r}")
