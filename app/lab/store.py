"""The run store: finished training runs in one SQLite file, so a run is trained once and opened by anyone.

A run is keyed by what decides its numbers: the canonical run spec (model config, training config, sample prompt;
see `run_spec`) and the engine version (`engine_version`). Its id is the first 16 hex digits of the SHA-256 of
that key, so the id is a content address: the same knobs on the same engine always name the same run, and a link
that carries both an id and knobs can be checked against each other.

It is a cache, never a source of truth, and it must never break a page:
  * one file, `runs.sqlite`, in the folder named by `EVA_DATA_DIR` (default: the user's cache folder, else a
    folder in the temp dir; Streamlit Community Cloud may mount the app read-only but its home and /tmp are
    writable);
  * WAL journal (readers never wait for the writer), a busy timeout for writers, one connection per operation
    (the run manager's threads and every session's script thread share the store safely, and so do two server
    processes on one file);
  * bounded: at most `max_bytes` of run data and `max_runs` runs; beyond that the least recently opened runs go
    first; freed pages return to the file system (incremental vacuum) and the WAL is truncated after a write;
  * a missing, read-only or corrupt file makes the store *unavailable*: every call returns None/False and
    `reason` says why in one sentence, and the lab trains as it would without a store. A write that still finds
    the file locked after the busy timeout is skipped (`last_error`), the store stays available.

Only runs that finished all their steps are stored under their key (status "done"): a run stopped by a user or by
the time cap ends at a step decided by a clock, so it is not a function of its key, and a Start on its knobs must
never be answered with it. Such a run is still kept, so that its tab can share it and reopen it after a reload, as a
*partial* run (`StoredRun.partial`): status "stopped" or "time limit", under an id of its own (`partial_id`: the
same 16-hex-digit form, derived from the key + a random suffix, so it never equals a content address) with the
key of its knobs' full run in the `full_id` column. Partial runs count toward both caps and are evicted before any
finished run (then each kind least recently opened first): every Stop makes a new row, and a run that any Start can
reuse is worth more than one only its link opens, so a class pressing Stop never pushes finished runs out.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

ENV_DIR = "EVA_DATA_DIR"
ENV_MAX_MB = "EVA_STORE_MAX_MB"
ENV_MAX_RUNS = "EVA_STORE_MAX_RUNS"
FILE_NAME = "runs.sqlite"
SCHEMA = 2                     # PRAGMA user_version; another value: the table is rebuilt (the store is a cache).
                               # 2: the full_id column (partial runs)
DEFAULT_MAX_MB = 64.0          # a default run is ~60 kB compressed: ~1000 runs
DEFAULT_MAX_RUNS = 2000
BUSY_TIMEOUT_S = 2.0
ID_LEN = 16
_ID_RE = re.compile(rf"[0-9a-f]{{{ID_LEN}}}")


class RunIdError(ValueError):
    """A malformed run id (the message says what a run id looks like)."""


def check_id(run_id) -> str:
    """`run_id` if it has the form of a run id, else RunIdError with a message a user can act on."""
    if isinstance(run_id, str) and _ID_RE.fullmatch(run_id.strip().lower()):
        return run_id.strip().lower()
    shown = repr(run_id) if not isinstance(run_id, str) or len(run_id) <= 40 else repr(run_id[:40] + "…")
    raise RunIdError(f"Run id {shown} is not a run id: a run id is {ID_LEN} hexadecimal digits (0-9, a-f), as "
                     "in the links the training lab writes. Check that the link was copied whole.")


# ====================================================================== what decides a run's numbers
_ROOT = Path(__file__).resolve().parents[2]
# The engine: every source file of core/ (the model, the data, the training loop, FP8, the GEMM library choice)
# plus the lab worker's after-run measurements (sample length, temperature). Hashing the files, not a hand-bumped
# constant: a constant that someone forgets to bump serves stale numbers as if they were this engine's, while a
# hash errs the safe way (a comment edit costs one retrain of each run, the store being a cache).
ENGINE_GLOBS = ("core/**/*.py", "app/lab/worker.py")
_engine: str | None = None
_engine_lock = threading.Lock()


def engine_version(root: Path | None = None) -> str:
    """16 hex digits of SHA-256 over the engine's source files (path + content, sorted by path), torch's version
    and the fp32 GEMM library setting (`core.gemm.ENV_VAR`: the libraries differ in summation order, so runs on
    different ones are different runs). Computed once per process for the repository root."""
    global _engine
    if root is None and _engine is not None:
        return _engine
    from importlib.metadata import PackageNotFoundError, version
    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - a source build of torch
        import torch
        torch_version = torch.__version__
    base = root or _ROOT
    h = hashlib.sha256()
    files = sorted({p for g in ENGINE_GLOBS for p in base.glob(g) if p.is_file()})
    for p in files:
        h.update(p.relative_to(base).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(f"torch={torch_version};gemm={os.environ.get('EVA_FP32_GEMM', 'auto')}".encode())
    v = h.hexdigest()[:16]
    if root is None:
        with _engine_lock:
            _engine = v
    return v


# TrainConfig fields that never change a finished run's numbers: the CLI's logging period and the wall-time cap
# (only runs that trained all their steps are stored).
_NOT_NUMBERS = ("log_every", "max_time_s")


def run_spec(model_cfg, train_cfg, prompt: str) -> dict:
    """The canonical description of a run: what it trains, how, and the text it samples after training.

    `model_cfg.to_hf()` (the resolved model: attention kind, K/V heads, dense layers, MTP depth are in it) and
    `train_cfg.to_dict()` with values that do not act replaced by what acts: `alpha` by the weight actually used
    (`balance_alpha`: 0 without an aux loss), `gamma` by None without the bias update, `kv_heads` dropped (the
    model config holds the resolved count). Two knob settings that train the same numbers get the same spec."""
    train = dict(train_cfg.to_dict())
    for k in _NOT_NUMBERS:
        train.pop(k, None)
    train["alpha"] = float(train_cfg.balance_alpha)
    if not train_cfg.uses_bias_update:
        train["gamma"] = None
    train.pop("kv_heads", None)
    # through JSON once: tuples become lists, so a spec equals itself read back from the store
    return json.loads(canonical_json({"model": model_cfg.to_hf(), "train": train, "prompt": str(prompt)}))


def canonical_json(obj) -> str:
    """Key-sorted compact JSON; tuples become lists and integral floats stay floats, so equal specs give equal
    text whatever their dict order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id(spec: dict, engine: str | None = None) -> str:
    """The id of the run `spec` trains on `engine` (default: this process's engine)."""
    key = canonical_json({"spec": spec, "engine": engine or engine_version()})
    return hashlib.sha256(key.encode()).hexdigest()[:ID_LEN]


PARTIAL = ("stopped", "time limit")  # statuses of a partial run (see the module docstring)


def partial_id(key: str) -> str:
    """A new id for a partial run of the knobs whose full run is `key`: a run id in form (links and `check_id`
    accept it), unique per call (two stops of the same knobs at different steps are two runs), never `key`."""
    return hashlib.sha256(f"{key}:partial:{uuid.uuid4().hex}".encode()).hexdigest()[:ID_LEN]


# ====================================================================== a stored run
@dataclass
class StoredRun:
    """What the lab shows of a finished run. `records`: every step record; `after`: the after-run measurements
    (sample, domain × expert matrix); `knobs`: the lab knobs that asked for it (for labels and links). A partial run
    (stopped by its user or the time cap) has status "stopped" / "time limit" and `full_id`, the key of its knobs'
    full run; `id` is then its own `partial_id`."""
    id: str
    spec: dict
    knobs: dict
    records: list
    after: dict = field(default_factory=dict)
    n_params: dict = field(default_factory=dict)
    status: str = "done"
    message: str | None = None
    started: float = 0.0       # unix time the training started
    finished: float = 0.0      # unix time it ended
    engine: str = ""
    full_id: str | None = None  # partial runs only: the content address of the knobs' full run

    @property
    def partial(self) -> bool:
        return self.full_id is not None

    @property
    def duration_s(self) -> float:
        return max(0.0, self.finished - self.started)


def default_folder() -> Path:
    """`EVA_DATA_DIR` if set; else the user's cache folder (XDG on Linux, ~/Library/Caches on macOS,
    %LOCALAPPDATA% on Windows) + /eva. The store falls back to the temp folder when that is not writable."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eva"


def _fallback_folder() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"eva-{uid}"


def _env_number(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, default))
        return v if v > 0 else default
    except ValueError:
        return default


def _pack(obj) -> bytes:
    return zlib.compress(canonical_json(obj).encode(), 6)


def _unpack(blob):
    return json.loads(zlib.decompress(blob).decode())


_TRANSIENT = ("locked", "busy")


class RunStore:
    """Finished runs in one SQLite file. Thread- and process-safe; never raises sqlite3/OS errors to callers."""

    def __init__(self, folder: str | Path | None = None, *, max_bytes: int | None = None,
                 max_runs: int | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.max_bytes = int(max_bytes if max_bytes is not None else _env_number(ENV_MAX_MB, DEFAULT_MAX_MB) * 2**20)
        self.max_runs = int(max_runs if max_runs is not None else _env_number(ENV_MAX_RUNS, DEFAULT_MAX_RUNS))
        self.busy_timeout_s = busy_timeout_s
        self.reason: str | None = None        # why the store is unavailable (None: available)
        self.last_error: str | None = None    # the last skipped operation (locked), store still available
        self.path: Path | None = None
        self.journal_mode: str | None = None
        explicit = folder is not None or bool(os.environ.get(ENV_DIR))
        candidates = [Path(folder) if folder is not None else default_folder()]
        if not explicit:  # only the default may move: a folder someone named is the one they meant
            candidates.append(_fallback_folder())
        errors = []
        for cand in candidates:
            err = self._open(cand / FILE_NAME)
            if err is None:
                return
            errors.append(err)
        self.path = candidates[0] / FILE_NAME
        self.reason = errors[0]

    # -- opening
    @property
    def available(self) -> bool:
        return self.reason is None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        return con

    def _open(self, path: Path) -> str | None:
        """Create/open the file and its table; None on success, else the reason (one sentence)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"the folder {path.parent} cannot be created ({e.strerror or e})"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"the folder {path.parent} is not writable"
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            return f"the file {path} is read-only"
        self.path = path
        try:
            con = self._connect()
            try:
                con.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only acts on a new file (before any table)
                mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                con.execute("PRAGMA journal_size_limit = 4194304")
                version = con.execute("PRAGMA user_version").fetchone()[0]
                con.execute("BEGIN IMMEDIATE")
                if version not in (0, SCHEMA):
                    con.execute("DROP TABLE IF EXISTS runs")
                con.execute("""CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, engine TEXT NOT NULL, spec TEXT NOT NULL, knobs TEXT NOT NULL,
                    status TEXT NOT NULL, message TEXT, n_params TEXT NOT NULL,
                    records BLOB NOT NULL, after BLOB NOT NULL, n_records INTEGER NOT NULL,
                    started REAL NOT NULL, finished REAL NOT NULL, last_used REAL NOT NULL, bytes INTEGER NOT NULL,
                    full_id TEXT)""")
                con.execute("CREATE INDEX IF NOT EXISTS runs_last_used ON runs (last_used)")
                con.execute(f"PRAGMA user_version = {SCHEMA}")
                con.execute("COMMIT")
                con.execute("SELECT count(*) FROM runs").fetchone()
            finally:
                con.close()
        except sqlite3.Error as e:
            return self._describe(e, path)
        self.journal_mode = mode
        return None

    def _describe(self, e: Exception, path: Path | None = None) -> str:
        path = path or self.path
        msg = str(e)
        low = msg.lower()
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return (f"the file {path} is damaged ({msg}); delete it (with its -wal and -shm files) to start an "
                    "empty store")
        if "readonly" in low or "read-only" in low:
            return f"the file {path} is read-only ({msg})"
        if any(t in low for t in _TRANSIENT):
            return f"the file {path} stayed locked by another process for {self.busy_timeout_s:g} s"
        return f"the file {path} cannot be used ({msg})"

    def _fail(self, e: Exception) -> None:
        """A failed operation: locked -> skipped (transient); anything else -> the store becomes unavailable."""
        low = str(e).lower()
        if isinstance(e, sqlite3.OperationalError) and any(t in low for t in _TRANSIENT):
            self.last_error = self._describe(e)
        elif "no such table" in low:  # the file was deleted under us (a temp-folder cleaner): start a new one
            self.last_error = f"the file {self.path} had disappeared; a new empty store was started"
            self.reason = self._open(self.path)
        else:
            self.reason = self._describe(e)

    # -- reading
    def get(self, rid: str) -> StoredRun | None:
        """The stored run `rid` (already checked with `check_id`), finished or partial, or None when absent or the
        store is unavailable. Opening a run marks it recently used (eviction keeps what classes open)."""
        if not self.available:
            return None
        try:
            con = self._connect()
            try:
                row = con.execute("SELECT id, engine, spec, knobs, status, message, n_params, records, after, "
                                  "started, finished, full_id FROM runs WHERE id = ?", (rid,)).fetchone()
                if row is None:
                    return None
                run = StoredRun(id=row[0], engine=row[1], spec=json.loads(row[2]), knobs=json.loads(row[3]),
                                status=row[4], message=row[5], n_params=json.loads(row[6]),
                                records=_unpack(row[7]), after=_unpack(row[8]), started=row[9], finished=row[10],
                                full_id=row[11])
                try:
                    con.execute("UPDATE runs SET last_used = ? WHERE id = ?", (time.time(), rid))
                except sqlite3.OperationalError:  # locked by a writer: the recency is a hint, not worth a wait
                    pass
                return run
            finally:
                con.close()
        except sqlite3.Error as e:
            self._fail(e)
            return None
        except (zlib.error, ValueError, TypeError) as e:  # one damaged row: treat it as absent (retrained, replaced)
            self.last_error = f"run {rid} is damaged in the store ({e}); it will be trained again"
            return None

    def has(self, rid: str) -> bool:
        if not self.available:
            return False
        try:
            con = self._connect()
            try:
                return con.execute("SELECT 1 FROM runs WHERE id = ?", (rid,)).fetchone() is not None
            finally:
                con.close()
        except sqlite3.Error as e:
            self._fail(e)
            return False

    def stats(self) -> dict | None:
        """{"runs", "partial" (of those runs), "bytes" (run data), "file_bytes" (the .sqlite file + its WAL)} or None
        when unavailable."""
        if not self.available:
            return None
        try:
            con = self._connect()
            try:
                n, b, part = con.execute("SELECT count(*), coalesce(sum(bytes), 0), count(full_id) FROM runs").fetchone()
            finally:
                con.close()
        except sqlite3.Error as e:
            self._fail(e)
            return None
        size = 0
        for p in (self.path, Path(str(self.path) + "-wal")):
            try:
                size += p.stat().st_size
            except OSError:  # the WAL comes and goes with checkpoints of other connections
                pass
        return {"runs": n, "partial": part, "bytes": b, "file_bytes": size}

    # -- writing
    def put(self, run: StoredRun) -> bool:
        """Store `run` (replacing a run with its id) and evict the least recently used runs beyond the caps.
        False when it was not stored: store unavailable, locked past the busy timeout, or the run alone is larger
        than the byte cap (`last_error` says which). A run is finished (status "done", no `full_id`) or partial
        (a `PARTIAL` status and the `full_id` of its knobs); anything else is refused."""
        if not self.available:
            return False
        if (run.status == "done") == run.partial or (run.partial and run.status not in PARTIAL):
            self.last_error = (f"run {run.id} cannot be stored: status {run.status!r} with full_id {run.full_id!r} "
                               f"(a finished run has status 'done' and no full_id, a partial run one of {PARTIAL} "
                               "and the id of its full run)")
            return False
        try:
            records, after = _pack(run.records), _pack(run.after)
            spec, knobs, n_params = canonical_json(run.spec), canonical_json(run.knobs), canonical_json(run.n_params)
        except (ValueError, TypeError) as e:  # a value JSON cannot hold (NaN, an object): not storable, not fatal
            self.last_error = f"run {run.id} cannot be stored: {e}"
            return False
        size = len(records) + len(after) + len(spec) + len(knobs) + len(n_params)
        if size > self.max_bytes:
            self.last_error = (f"run {run.id} is {size:,} bytes, more than the store's whole cap "
                               f"({self.max_bytes:,} bytes, {ENV_MAX_MB})")
            return False
        now = time.time()
        try:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (run.id, run.engine or engine_version(), spec, knobs, run.status, run.message, n_params,
                             records, after, len(run.records), run.started, run.finished, now, size, run.full_id))
                self._evict(con, keep=run.id)
                con.execute("COMMIT")
                con.execute("PRAGMA incremental_vacuum")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                con.close()
        except sqlite3.Error as e:
            self._fail(e)
            return False
        self.last_error = None
        return True

    def _evict(self, con: sqlite3.Connection, keep: str) -> None:
        """Delete runs (never `keep`) until both caps hold: partial runs first, then finished ones, each kind least
        recently used first (why: the module docstring). Inside the writer's transaction, so two processes never
        evict past each other."""
        n, total = con.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM runs").fetchone()
        if n <= self.max_runs and total <= self.max_bytes:
            return
        drop = []
        for rid, b in con.execute("SELECT id, bytes FROM runs WHERE id != ? "
                                  "ORDER BY full_id IS NULL, last_used, finished", (keep,)):
            if n <= self.max_runs and total <= self.max_bytes:
                break
            drop.append((rid,))
            n, total = n - 1, total - b
        con.executemany("DELETE FROM runs WHERE id = ?", drop)
