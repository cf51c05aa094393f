"""A package that can also be called: `maskstudio.run(spec, ...)` runs, `maskstudio.train(spec, ...)`
trains, although `run` and `train` are packages (their modules keep their own names)."""
from __future__ import annotations

import sys
import types
from typing import Callable


def make_callable(module_name: str, fn: Callable) -> None:
    """Calling the module `module_name` calls `fn` (its class becomes a ModuleType with __call__)."""

    class CallablePackage(types.ModuleType):
        __doc__ = f"Calling this package calls {fn.__module__}.{fn.__name__}."

        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = CallablePackage
