"""Budgets: what one session, and the whole app process, may keep on disk and in memory.

Disk. Every file the app writes lives in WORKDIR, one folder per process (inside Gradio's cache
when app.py says so through $MASKSTUDIO_TEMP: Gradio then serves our files instead of copying each
one, so a file costs its bytes once). A session's files live in WORKDIR/sessions/<digest of its
id>/<kind>/. A kind (the run download, the export) is one slot holding the files of one request:
the same request again gets the same files back (no new bytes, and Gradio sees the same file),
another request replaces them. One-off run pictures keep the newest knobs.SESSION_PICTURES.
Before a write, `require_room` checks knobs.SESSION_DISK_BYTES and knobs.PROCESS_DISK_BYTES and
refuses with one line naming the limit (`BudgetError`).

Memory. `deep_bytes` measures what a value holds (tensors, arrays, pictures, strings, containers),
so undo (knobs.HISTORY_BYTES) and the caches (knobs.RUNS_MAX_BYTES, knobs.PICTURE_CACHE_BYTES)
are bounded by bytes; `image_problem` refuses uploaded images by their header, before a pixel is
decoded (knobs.IMAGE_MAX_PIXELS per image, knobs.RUN_IMAGE_MAX_PIXELS per run).

The session is a context variable: app.py sets it per event from Gradio's session hash
(`session(...)`); without one (tests, scripts) every request gets a fresh folder, as before.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import types
import unicodedata
import uuid
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

from .. import knobs


class BudgetError(ValueError):
    """A request refused because it would pass a disk or memory budget; str() is one line naming it."""


def _make_workdir() -> str:
    """The process's folder for pictures and downloads (under $MASKSTUDIO_TEMP when set), removed at exit."""
    parent = os.environ.get("MASKSTUDIO_TEMP") or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix="maskstudio-app-", dir=parent)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


WORKDIR = _make_workdir()
_SESSION: ContextVar[str | None] = ContextVar("maskstudio_session", default=None)
_LOCKS = [threading.Lock() for _ in range(64)]  # striped: one session's slot is written by one request at a time
_MARK = ".request.json"                           # in a slot: the request key and the names of its files


# ---------------------------------------------------------------- text that reaches files and messages
def size_text(n: int) -> str:
    """Bytes as people read them: '512 MiB', '1.5 GiB', '12 KiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def safe_stem(name, default: str) -> str:
    """A file-name stem from a user's string (a design's name): ASCII letters, digits and . _ -
    only (accents dropped, the rest '_'), at most knobs.STEM_MAX characters, never empty or
    hidden, so no lone surrogate, path separator or over-long name reaches the filesystem."""
    text = "".join(c for c in unicodedata.normalize("NFKD", str(name)) if not unicodedata.combining(c))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:knobs.STEM_MAX].strip("._-")
    return stem or default


def shown(text, limit: int = 60) -> str:
    """A user's string (an upload's name) as it may appear in a message: one line, no lone
    surrogates (they cannot be sent as JSON), at most `limit` characters."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", str(text)).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 1] + "…"


_LONE = re.compile("[\ud800-\udfff]")


def plain_text(value):
    """`value` with lone surrogates replaced by U+FFFD in a string, or in the strings of a list or
    tuple: what a client sends through the API that is not text reaches no tokenizer, file or
    message (JSON cannot carry it back)."""
    if isinstance(value, str):
        return _LONE.sub("\ufffd", value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain_text(v) for v in value)
    return value


def disk_error_line(err: OSError) -> str:
    """A failed write as one line without the server's paths (the OS names them in str(err))."""
    reason = err.strerror or type(err).__name__
    return f"could not write the file on the server ({reason})"


# ---------------------------------------------------------------- sessions and their folders
@contextmanager
def session(session_id):
    """Files written inside this block belong to `session_id`: Gradio's session hash, or a request
    that has one (`.session_hash`); None: no session."""
    session_id = getattr(session_id, "session_hash", session_id)
    sid = hashlib.sha256(str(session_id).encode("utf-8", "backslashreplace")).hexdigest()[:24] \
        if session_id else None
    token = _SESSION.set(sid)
    try:
        yield
    finally:
        _SESSION.reset(token)


def session_folder() -> str | None:
    """This session's folder (not created), or None outside a session."""
    sid = _SESSION.get()
    return os.path.join(WORKDIR, "sessions", sid) if sid else None


def end_session(session_id) -> None:
    """Delete a session's files (its tab closed); `session_id` as for `session`."""
    with session(session_id):
        folder = session_folder()
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def folder_bytes(path: str | None) -> int:
    """Bytes of the files under `path` (0 when it does not exist; files vanishing meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(path or os.devnull):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def require_room(nbytes: int, what: str) -> None:
    """Refuse (BudgetError) when writing `nbytes` more would take this session past
    knobs.SESSION_DISK_BYTES or every file of the app past knobs.PROCESS_DISK_BYTES."""
    folder = session_folder()
    if folder is not None:
        used = folder_bytes(folder)
        if used + nbytes > knobs.SESSION_DISK_BYTES:
            held = f" ({size_text(used)} held by your other downloads and pictures)" if used else ""
            raise BudgetError(f"{what} would take {size_text(nbytes)}, over this session's disk budget of "
                              f"{size_text(knobs.SESSION_DISK_BYTES)}{held}; make it smaller")
    if folder_bytes(WORKDIR) + nbytes > knobs.PROCESS_DISK_BYTES:
        raise BudgetError(f"the server's disk budget for downloads ({size_text(knobs.PROCESS_DISK_BYTES)}) is "
                          f"full; try again in a few minutes (old files are deleted after "
                          f"{knobs.WORKDIR_MAX_AGE_S // 60} minutes)")


def _kept(folder: str, key: str) -> list[str] | None:
    """The slot's files when they were made for request `key` and are all still there."""
    try:
        with open(os.path.join(folder, _MARK), encoding="utf-8") as fh:
            mark = json.load(fh)
    except (OSError, ValueError):
        return None
    paths = [os.path.join(folder, name) for name in mark.get("files", [])]
    if mark.get("key") != key or not paths or not all(os.path.isfile(p) for p in paths):
        return None
    for path in paths:  # handed out again: young again for the age sweep
        os.utime(path)
    return paths


def _clear(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def session_files(kind: str, key: str, write: Callable[[str], list[str]]) -> list[str]:
    """The files of one request (`key`) of `kind`: this session's kept files when they were made
    for the same request (a repeated click writes nothing), else `write(folder)` into the emptied
    slot (it calls `require_room` before anything large). Outside a session: a fresh folder."""
    folder = session_folder()
    if folder is None:
        fresh = os.path.join(WORKDIR, kind, uuid.uuid4().hex[:12])
        os.makedirs(fresh, exist_ok=True)
        return write(fresh)
    folder = os.path.join(folder, kind)
    with _LOCKS[hash((folder, kind)) % len(_LOCKS)]:
        kept = _kept(folder, key)
        if kept is not None:
            return kept
        _clear(folder)
        try:
            paths = write(folder)
        except BaseException:
            _clear(folder)
            raise
        with open(os.path.join(folder, _MARK), "w", encoding="utf-8") as fh:
            json.dump({"key": key, "files": [os.path.basename(p) for p in paths]}, fh)
        return paths


def picture_path() -> str:
    """A path for a one-off picture (a run's): in this session's picture folder, which keeps the
    newest knobs.SESSION_PICTURES; outside a session a fresh name in WORKDIR."""
    name = f"{uuid.uuid4().hex}.png"
    folder = session_folder()
    if folder is None:
        return os.path.join(WORKDIR, name)
    folder = os.path.join(folder, "pictures")
    os.makedirs(folder, exist_ok=True)
    with _LOCKS[hash((folder, "pictures")) % len(_LOCKS)]:
        _keep_newest(folder, max(knobs.SESSION_PICTURES - 1, 0))
    return os.path.join(folder, name)


def _keep_newest(folder: str, keep: int) -> None:
    entries = []
    for entry in os.scandir(folder):
        try:
            entries.append((entry.stat().st_mtime, entry.path))
        except OSError:
            continue
    for _, path in sorted(entries, reverse=True)[keep:]:
        try:
            os.remove(path)
        except OSError:
            pass


# ---------------------------------------------------------------- memory
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, threading.Lock().__class__)


def _payload_bytes(obj) -> int | None:
    """Bytes of a tensor, array or picture (None for anything else)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int) and type(obj).__module__.startswith("numpy"):
        return nbytes
    image_type = getattr(sys.modules.get("PIL.Image"), "Image", None)  # None while PIL is still importing
    if isinstance(image_type, type) and isinstance(obj, image_type):
        return obj.width * obj.height * len(obj.getbands())
    return None


def deep_bytes(obj, limit: int = 1_000_000) -> int:
    """About how many bytes `obj` holds: its tensors, arrays and pictures by their data, strings
    and containers by sys.getsizeof, objects through their attributes; each object counted once,
    functions, classes and modules not at all (shared code, not data). Walks at most `limit` objects."""
    seen: set[int] = set()
    stack, total = [obj], 0
    while stack and len(seen) < limit:
        x = stack.pop()
        if id(x) in seen or isinstance(x, _OPAQUE):
            continue
        seen.add(id(x))
        payload = _payload_bytes(x)
        if payload is not None:
            total += payload
            continue
        total += sys.getsizeof(x, 64)
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif not isinstance(x, (str, bytes, bytearray, int, float, complex, bool)) and x is not None:
            stack.extend(getattr(x, "__dict__", {}).values())
            stack.extend(getattr(x, s) for s in getattr(type(x), "__slots__", ()) if hasattr(x, s))
    return total


def image_problem(paths) -> str:
    """'' when every file is an image within knobs.IMAGE_MAX_PIXELS (and all of them within
    knobs.RUN_IMAGE_MAX_PIXELS), else one line naming the upload and the limit. Reads headers
    only: nothing is decoded, so a small file that would decode to gigabytes costs nothing."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = knobs.IMAGE_MAX_PIXELS  # PIL's own check when anything opens an image later
    total = 0
    for path in paths:
        name = shown(os.path.basename(str(path)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    w, h = img.size
        except Image.DecompressionBombError as err:  # PIL's own check (past twice the limit), from the header too
            found = re.search(r"\((\d+) pixels\)", str(err))
            w, h = (int(found.group(1)), 1) if found else (knobs.IMAGE_MAX_PIXELS + 1, 1)
        except (OSError, ValueError, SyntaxError) as err:  # not an image, truncated, unknown format
            return f"upload '{name}' is not an image this server can read ({type(err).__name__})"
        if w * h > knobs.IMAGE_MAX_PIXELS:
            size = f"{w} x {h} = {w * h:,} pixels" if h > 1 else f"{w:,} pixels"
            return (f"upload '{name}' has {size}, over the limit of {knobs.IMAGE_MAX_PIXELS:,} pixels per image; "
                    f"downscale it (the models see a few hundred thousand pixels at most)")
        total += w * h
        if total > knobs.RUN_IMAGE_MAX_PIXELS:
            return (f"the uploads have over {knobs.RUN_IMAGE_MAX_PIXELS:,} pixels together (the limit per run); "
                    f"use fewer or smaller images")
    return ""
