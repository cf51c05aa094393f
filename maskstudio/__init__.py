"""Mask Studio: compose attention masks and position ids from modality segments.

One rule representation (spec.py + patterns.py) feeds every backend: dense masks,
FlexAttention mask_mods and BlockMasks, analysis, pictures, live model runs and export.
"""
from .spec import Spec, SpecError

__version__ = "0.1.0"
__all__ = ["Spec", "SpecError", "analyze", "load_preset", "list_presets", "render", "flow_graph",
           "reachability", "run", "compare"]


def __getattr__(name):
    """Heavier parts load on first use, so `import maskstudio` stays light."""
    if name == "analyze":
        from .analysis import analyze
        return analyze
    if name in ("load_preset", "list_presets"):
        from . import presets
        return getattr(presets, name)
    if name in ("render",):
        from .viz import render
        return render
    if name in ("flow_graph", "reachability"):
        from . import flow
        return getattr(flow, name)
    if name in ("run", "compare"):
        from . import runner
        return getattr(runner, name)
    if name in ("analysis", "compile", "evaluate", "export", "flow", "positions", "presets", "runner",
                "studio", "tokens", "viz", "vlm", "patterns", "schema", "bounds"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'maskstudio' has no attribute {name!r}")
