"""The preset gallery: one spec JSON per published design, in `presets/` at the repo root.

Presets are data, never code: each file is an ordinary spec with a `name` (its file stem), a
`group`, a `citation` and a `description` that says what is verified from the authors' code
and what is inferred. `load_preset(name, sizes=...)` rescales segments via Spec.with_sizes.
The folder can be overridden with the MASKSTUDIO_PRESETS environment variable.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

from .errors import SpecError, did_you_mean
from .spec import Spec

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


def origin(provenance: dict | None) -> str:
    """One line: where a design comes from, e.g. `code: owner/repo@abc123 file.py:build_mask`."""
    if not provenance:
        return "not stated"
    where = provenance.get("repo", "")
    if "commit" in provenance:
        where += f"@{provenance['commit']}"
    if "file" in provenance:
        where += f" {provenance['file']}" + (f":{provenance['function']}" if "function" in provenance else "")
    note = f" ({provenance['note']})" if "note" in provenance else ""
    return f"{provenance['source']}: {where.strip() or 'see the citation'}{note}"


def _read_preset(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError("preset", f"cannot read preset file {path.name}: {err}") from None
    if not isinstance(data, dict):
        raise SpecError("preset", f"preset file {path.name} is not a JSON object")
    return data


@functools.lru_cache(maxsize=1024)
def _entry(path: str, stem: str, mtime_ns: int, size: int) -> dict:
    """A preset's gallery entry, read once per version of its file (the app asks on every edit)."""
    data = _read_preset(Path(path))
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else None
    return {"name": stem, "file": path, "group": str(data.get("group", "other")),
            "citation": str(data.get("citation", "")), "description": str(data.get("description", "")),
            "provenance": prov, "source": (prov or {}).get("source", "?"), "origin": origin(prov)}


def list_presets() -> list[dict]:
    """One dict per preset: name, file, group, citation, description, provenance, source ("code" /
    "paper" / "inferred") and origin (one line), sorted by group, then name."""
    out = []
    for stem, path in _files().items():
        try:
            st = path.stat()
        except OSError as err:
            raise SpecError("preset", f"cannot read preset file {path.name}: {err}") from None
        out.append(copy.deepcopy(_entry(str(path), stem, st.st_mtime_ns, st.st_size)))
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(out, key=lambda d: (order.get(d["group"], len(GROUPS)), d["name"]))


def _resolve(name: str) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise SpecError("preset", f"give a preset name (a string), got {name!r}; see maskstudio.list_presets()")
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
