"""Mask Studio: compose attention masks and position ids from modality segments.

One rule representation (spec.py + patterns.py) feeds every backend: dense masks,
FlexAttention mask_mods and BlockMasks, analysis, pictures, live model runs and export.
The layers and their import order are in docs/ARCHITECTURE.md.
"""
from .errors import RunError, SpecError
from .spec import Spec

__version__ = "0.1.0"
__all__ = ["Spec", "SpecError", "RunError", "analyze", "load_preset", "list_presets", "render", "flow_graph",
           "reachability", "run", "compare", "knockout", "load_model"]

_NAMES = {"analyze": "analysis", "load_preset": "presets", "list_presets": "presets", "render": "viz",
          "flow_graph": "flow", "reachability": "flow", "compare": "run", "knockout": "run", "load_model": "run"}
_MODULES = ("analysis", "bounds", "cli", "errors", "evaluate", "export", "flow", "knobs", "patterns", "train",
            "positions", "presets", "program", "run", "schema", "segments", "studio", "tiled", "tokens", "viz")


def __getattr__(name):
    """Heavier parts load on first use, so `import maskstudio` stays light. `maskstudio.run` is the
    run package, callable as the run function (`maskstudio.run(spec, model=None, ...)`)."""
    import importlib

    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'maskstudio' has no attribute {name!r}")
