"""The run store (app/lab/store.py): round trip, canonical keys, bounded size, and every fault a hosted server meets
(corrupt file, read-only folder, a lock held by another process, two processes writing at once, bad run ids) —
the store reports itself unavailable or skips the write, and never raises."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.lab import store as rs
from core.config import get_preset
from core.train import APP_DEFAULT, resolve_model_config

ROOT = Path(__file__).resolve().parent.parent


def spec(**train):
    cfg = APP_DEFAULT.replace(**train)
    return rs.run_spec(resolve_model_config(get_preset("mini"), cfg), cfg, "47+8=")


def make_run(seed=0, n=150, prompt="47+8=", **train) -> rs.StoredRun:
    cfg = APP_DEFAULT.replace(seed=seed, **train)
    sp = rs.run_spec(resolve_model_config(get_preset("mini"), cfg), cfg, prompt)
    recs = [{"step": i + 1, "loss": 5.5 / (i + 1), "val_loss": None if i % 25 else 5.0 - i / 100,
             "expert_loads": [[i % 7 + e for e in range(16)]] * 2, "router_bias": [[0.01 * e for e in range(16)]] * 2,
             "max_vio": 0.5 / (i + 1)} for i in range(n)]
    after = {"sample": {"text": "47+8=55 é \\xff", "mtp_acceptance": 0.81},
             "domains": {"domains": ["arithmetic", "brackets"], "relative": [[[1.0, 2.0], [0.5, 1.5]]]}}
    return rs.StoredRun(id=rs.run_id(sp), spec=sp, knobs={"tr_seed": seed}, records=recs, after=after,
                        n_params={"total": 1234}, started=1000.0 + seed, finished=1017.5 + seed)


def test_round_trip(tmp_path):
    st = rs.RunStore(tmp_path)
    assert st.available and st.reason is None and st.journal_mode == "wal"
    run = make_run()
    assert st.get(run.id) is None and not st.has(run.id)
    assert st.put(run)
    back = st.get(run.id)
    assert back.records == run.records and back.after == run.after and back.spec == run.spec
    assert back.knobs == run.knobs and back.n_params == run.n_params and back.status == "done"
    assert back.duration_s == pytest.approx(17.5) and back.engine == rs.engine_version()
    # a new RunStore on the same folder (a server restart) finds it
    assert rs.RunStore(tmp_path).get(run.id).records == run.records


def test_key_canonicalisation():
    base = rs.run_id(spec())
    # values that do not act, and the CLI/time-cap fields, do not change the run
    assert rs.run_id(spec(max_time_s=120.0, log_every=5)) == base
    assert rs.run_id(spec(balancing="none", gamma=1e-3)) == rs.run_id(spec(balancing="none", gamma=3e-2))
    assert rs.run_id(spec(balancing="aux_loss")) == rs.run_id(spec(balancing="aux_loss", alpha=1e-3))
    # every value that acts does
    others = [spec(seed=1), spec(lr=1e-3), spec(gamma=1e-3), spec(balancing="aux_loss"), spec(mtp=False),
              spec(precision="bf16"), spec(attention="mha"), spec(ffn="dense"), spec(steps=50)]
    ids = {rs.run_id(s) for s in others}
    assert base not in ids and len(ids) == len(others)
    cfg = APP_DEFAULT
    m = resolve_model_config(get_preset("mini"), cfg)
    assert rs.run_id(rs.run_spec(m, cfg, "The ")) != rs.run_id(rs.run_spec(m, cfg, "47+8="))  # the sample differs
    # dict order does not matter; the engine does
    sp = spec()
    shuffled = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v for k, v in reversed(sp.items())}
    assert rs.run_id(shuffled) == base
    assert rs.run_id(sp, engine="0" * 16) != base
    assert len(base) == rs.ID_LEN and rs.check_id(base) == base


def test_engine_version_follows_the_core_sources(tmp_path):
    shutil.copytree(ROOT / "core", tmp_path / "core", ignore=shutil.ignore_patterns("__pycache__"))
    v = rs.engine_version(tmp_path)
    assert v == rs.engine_version(tmp_path)
    with open(tmp_path / "core" / "moe.py", "a") as f:
        f.write("\n# a change\n")
    assert rs.engine_version(tmp_path) != v


def test_bad_ids():
    for bad in ["", "xyz", "../../etc/passwd", "0123456789abcdeg", "0123456789abcdef0", None, 123, "a" * 500]:
        with pytest.raises(rs.RunIdError, match="is not a run id: a run id is 16 hexadecimal digits"):
            rs.check_id(bad)
    assert rs.check_id(" 0123456789ABCDEF ") == "0123456789abcdef"


def test_eviction_by_count_keeps_recently_opened(tmp_path):
    st = rs.RunStore(tmp_path, max_runs=3)
    runs = [make_run(seed=s, n=5) for s in range(3)]
    for r in runs:
        assert st.put(r)
    assert st.get(runs[0].id) is not None  # opened: now the most recently used
    extra = make_run(seed=10, n=5)
    assert st.put(extra)
    assert st.stats()["runs"] == 3
    assert not st.has(runs[1].id)  # the least recently used went first
    assert all(st.has(r.id) for r in (runs[0], runs[2], extra))


def test_eviction_by_bytes_bounds_the_file(tmp_path):
    one = make_run(seed=0)
    probe = rs.RunStore(tmp_path / "probe")
    probe.put(one)
    size = probe.stats()["bytes"]
    cap = 5 * size + size // 2
    st = rs.RunStore(tmp_path / "capped", max_bytes=cap)
    for s in range(40):
        assert st.put(make_run(seed=s))
        info = st.stats()
        assert info["bytes"] <= cap
    assert info["runs"] == 5
    assert st.has(make_run(seed=39).id) and not st.has(make_run(seed=0).id)
    # freed pages go back to the file system and the WAL is truncated: the file stays near the cap
    assert info["file_bytes"] < cap + 256 * 1024
    # a run JSON cannot hold is refused with a reason
    bad = make_run(seed=99)
    bad.after = {"x": float("nan")}
    assert not st.put(bad) and "cannot be stored" in st.last_error and st.available
    # a run larger than the whole cap is refused with a reason, the store stays available
    tiny = rs.RunStore(tmp_path / "tiny", max_bytes=1000)
    assert not tiny.put(one) and "more than the store's whole cap" in tiny.last_error and tiny.available


def test_corrupt_file_is_survived(tmp_path):
    (tmp_path / rs.FILE_NAME).write_bytes(b"this is not an SQLite file" * 200)
    st = rs.RunStore(tmp_path)
    assert not st.available and "damaged" in st.reason and str(tmp_path) in st.reason
    run = make_run()
    assert st.get(run.id) is None and st.put(run) is False and st.stats() is None and not st.has(run.id)


def test_corruption_inside_a_valid_file_is_survived(tmp_path):
    st = rs.RunStore(tmp_path)
    for s in range(3):
        st.put(make_run(seed=s))
    path = tmp_path / rs.FILE_NAME
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)  # every page after the first (the header stays valid)
    path.write_bytes(bytes(data))
    st2 = rs.RunStore(tmp_path)
    got = st2.get(make_run(seed=1).id)  # must not raise
    assert got is None
    assert not st2.available or st2.last_error


def test_file_deleted_while_open_starts_a_new_store(tmp_path):
    st = rs.RunStore(tmp_path)
    run = make_run()
    st.put(run)
    for p in tmp_path.iterdir():
        p.unlink()
    assert st.get(run.id) is None
    assert st.put(run) and st.get(run.id) is not None


def test_missing_folder_is_created_and_unusable_folder_is_unavailable(tmp_path):
    st = rs.RunStore(tmp_path / "a" / "b")
    assert st.available and (tmp_path / "a" / "b" / rs.FILE_NAME).exists()
    (tmp_path / "file").write_text("x")
    st = rs.RunStore(tmp_path / "file" / "sub")
    assert not st.available and "cannot be created" in st.reason
    assert st.put(make_run()) is False and st.get("0" * 16) is None


def _read_only(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` with `folder` read-only: a read-only bind mount in a user namespace (root ignores file modes),
    else the folder's mode."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
        finally:
            folder.chmod(0o755)
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("running as root without user namespaces: cannot make a folder read-only")
    q = f"'{folder}'"
    sh = f"mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec {sys.executable} -c \"$0\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", sh, code], env=env, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("existing", [False, True])
def test_read_only_folder(tmp_path, existing):
    run = make_run()
    if existing:
        assert rs.RunStore(tmp_path).put(run)
    code = textwrap.dedent(f"""
        from app.lab import store as rs
        st = rs.RunStore({str(tmp_path)!r})
        print("available", st.available)
        print("reason", st.reason)
        print("get", st.get({run.id!r}) is None, "stats", st.stats())
    """)
    res = _read_only(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert "available False" in res.stdout and "not writable" in res.stdout
    assert "get True" in res.stdout and "stats None" in res.stdout


def test_locked_file_skips_the_write_and_stays_available(tmp_path):
    st = rs.RunStore(tmp_path, busy_timeout_s=0.2)
    first = make_run(seed=1)
    st.put(first)
    holder = sqlite3.connect(str(tmp_path / rs.FILE_NAME), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        run = make_run(seed=2)
        assert st.put(run) is False
        assert st.available and "locked" in st.last_error
        assert st.get(first.id) is not None  # WAL: readers do not wait for a writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert st.put(run) and st.last_error is None and st.has(run.id)


def test_two_processes_write_at_once(tmp_path):
    rs.RunStore(tmp_path)  # create the file first (as the server does at start-up)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_run_store import make_run
        from app.lab import store as rs
        st = rs.RunStore({str(tmp_path)!r}, busy_timeout_s=10)
        base = int(sys.argv[1])
        ok = [st.put(make_run(seed=base + i, n=40)) for i in range(15)]
        print(sum(ok), st.last_error, st.reason)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for b in (0, 100)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split()[0] == "15", out
    st = rs.RunStore(tmp_path)
    assert st.stats()["runs"] == 30
    assert all(st.get(make_run(seed=s, n=40).id).records[-1]["step"] == 40 for s in [*range(15), *range(100, 115)])


def make_partial(full: rs.StoredRun, step: int, status: str = "time limit") -> rs.StoredRun:
    """The run `full` cut at `step` (by the time cap or a Stop), as the manager stores it."""
    return rs.StoredRun(id=rs.partial_id(full.id), spec=full.spec, knobs=full.knobs, records=full.records[:step],
                        after=full.after, status=status, message=f"Stopped at step {step}", started=full.started,
                        finished=full.started + 1.0, full_id=full.id)


def test_partial_runs_have_ids_of_their_own(tmp_path):
    st = rs.RunStore(tmp_path)
    full = make_run(n=30)
    cut, stopped = make_partial(full, 7), make_partial(full, 7, status="stopped")
    assert cut.id != full.id and stopped.id != cut.id, "two cuts of one run's knobs are two runs"
    assert rs.check_id(cut.id) == cut.id, "a partial id has the form a link carries"
    assert st.put(cut) and st.put(stopped)
    back = st.get(cut.id)
    assert back.partial and back.full_id == full.id and back.status == "time limit" and len(back.records) == 7
    assert st.get(stopped.id).status == "stopped"
    assert st.get(full.id) is None and not st.has(full.id), "the knobs' own id names no run until the full run"
    assert st.stats()["runs"] == 2 and st.stats()["partial"] == 2
    assert st.put(full) and not st.get(full.id).partial and st.get(full.id).full_id is None
    assert len(st.get(full.id).records) == 30 and len(st.get(cut.id).records) == 7, "both kept, apart"
    assert st.stats()["partial"] == 2 and st.stats()["runs"] == 3
    # a finished run is status 'done' without full_id, a partial one a cut status with it: anything else is refused
    for bad in (rs.StoredRun(**{**vars(full), "full_id": full.id}),
                rs.StoredRun(**{**vars(cut), "full_id": None}),
                rs.StoredRun(**{**vars(cut), "status": "diverged"})):
        assert not st.put(bad) and "cannot be stored" in st.last_error and st.available


def test_partial_runs_are_evicted_before_finished_ones(tmp_path):
    st = rs.RunStore(tmp_path, max_runs=3)
    old, new = make_run(seed=0, n=5), make_run(seed=1, n=5)
    assert st.put(old) and st.put(new)
    cut = make_partial(make_run(seed=2, n=5), 3)
    assert st.put(cut)
    assert st.get(cut.id) is not None  # opened last: still the first to go, being partial
    extra = make_run(seed=3, n=5)
    assert st.put(extra)
    assert not st.has(cut.id) and all(st.has(r.id) for r in (old, new, extra))
    # with no partial run left, the least recently used finished run goes
    assert st.put(make_run(seed=4, n=5)) and not st.has(old.id)


def test_another_schema_rebuilds_the_table(tmp_path):
    path = tmp_path / rs.FILE_NAME
    con = sqlite3.connect(str(path))
    con.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, engine TEXT, spec TEXT)")  # an older layout, one row
    con.execute("INSERT INTO runs VALUES ('0123456789abcdef', 'e', '{}')")
    con.execute(f"PRAGMA user_version = {rs.SCHEMA - 1}")
    con.commit()
    con.close()
    st = rs.RunStore(tmp_path)
    assert st.available and st.stats()["runs"] == 0, "the cache of another schema is dropped, not misread"
    full = make_run(n=5)
    cut = make_partial(full, 2)
    assert st.put(full) and st.put(cut) and st.get(cut.id).full_id == full.id
    con = sqlite3.connect(str(path))
    assert con.execute("PRAGMA user_version").fetchone()[0] == rs.SCHEMA
    con.close()
