"""The preset gallery: one spec JSON per published design, in `presets/` at the repo root.

Presets are data, never code: each file is an ordinary spec with a `name` (its file stem), a
`group`, a `citation` and a `description` that says what is verified from the authors' code
and what is inferred. `load_preset(name, sizes=...)` rescales segments via Spec.with_sizes.
The folder can be overridden with the MASKSTUDIO_PRESETS environment variable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .spec import Spec, SpecError, did_you_mean

GROUPS = ("video", "image-text", "streaming", "parallel/branches", "embeddings/bidirectional",
          "audio", "reasoning", "other")


def presets_dir() -> Path:
    env = os.environ.get("MASKSTUDIO_PRESETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "presets"


def _files() -> dict[str, Path]:
    folder = presets_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def list_presets() -> list[dict]:
    """One dict per preset: name, file, group, citation, description (sorted by group, then name)."""
    out = []
    for stem, path in _files().items():
        data = json.loads(path.read_text(encoding="utf-8"))
        out.append({"name": stem, "file": str(path), "group": data.get("group", "other"),
                    "citation": data.get("citation", ""), "description": data.get("description", "")})
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(out, key=lambda d: (order.get(d["group"], len(GROUPS)), d["name"]))


def _resolve(name: str) -> Path:
    files = _files()
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key.endswith(".json"):
        key = key[:-5]
    if key in files:
        return files[key]
    raise SpecError("preset", f"no preset named '{name}'{did_you_mean(key, files)}; "
                    f"see maskstudio.list_presets() ({len(files)} presets in {presets_dir()})")


def load_preset(name: str, sizes: dict | None = None) -> Spec:
    """The preset's Spec, optionally rescaled: sizes={"segment": 12 | [h, w] | [t, h, w]}."""
    spec = Spec.load(_resolve(name))
    return spec.with_sizes(sizes) if sizes else spec
