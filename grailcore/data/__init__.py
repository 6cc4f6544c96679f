"""Data: typed schema, synthetic study, prompt rendering and loaders (see each module).

Exports resolve lazily (PEP 562) so `python -m grailcore.data.<module>` runs a module that
the package has not already imported.
"""

import importlib

_EXPORTS = {
    "LoadResult": "loaders",
    "load_examples": "loaders",
    "build_example": "prompt",
    "generate_study": "synth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"grailcore.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'grailcore.data' has no attribute {name!r}")
