"""The training lab with its run store (issue 17), under AppTest: a classroom's sessions pressing Start on the same
knobs share one training; a finished run opens from its link after a server restart with no training; a reload
keeps the tab's runs; a stored run shows at once with "Train again"; a corrupt store is survived; bad run ids are
messages; a queued run shows its position and wait; a joined viewer's Stop does not stop the others' run; a
lesson step keeps the student's own knobs; a run cut by the time cap or Stop is kept as a partial run that its link
and a reload open, labelled, and that a Start on its knobs never shows.

Runs are tiny (25 steps of 4 × 32 tokens) and each test trains at most one to completion."""
from __future__ import annotations

import json
import time

from test_app_training import (LONG, TINY, _drain, clean, fresh_store, lab, loss_chart, loss_points,  # noqa: F401
                               poll_until, run_of, share_links, stopped_run)
from test_app_training import idle_server, patient_server  # noqa: F401  (fixtures: an idle, patient manager with an
# empty store per test)

from apptest_helpers import HANG_S
from core.train import APP_DEFAULT

from app.lab import session
from app.lab.store import RunStore


def _results(at) -> list[str]:
    return [s.value for s in at.header]


def test_same_knobs_train_once_and_open_from_a_link_after_a_restart(idle_server, tmp_path):  # noqa: F811
    folder = tmp_path / "store"
    a, b = lab(TINY), lab(TINY)
    seq0 = idle_server._seq  # the manager is process-wide: count this test's trainings only
    a.button(key="tr_start").click().run()
    run = run_of(a)
    b.button(key="tr_start").click().run()
    clean(b)
    assert run_of(b) is run, "the second session joins the run instead of queueing a copy"
    assert idle_server._seq == seq0 + 1 and not idle_server.queue, "one training for both"
    assert any("Joined" in i.value and "instead of training a copy" in i.value for i in b.info)
    assert run.viewers == {a.session_state["_tr_sid"], b.session_state["_tr_sid"]}
    poll_until(b, lambda: not run.active)
    a.run()
    clean(a)
    clean(b)
    assert run.status == "done"
    for at in (a, b):
        assert "Compare runs" in _results(at)
        hist = at.session_state["_tr_history"]
        assert [r.key for r in hist] == [run.key] and hist[0].records == run.records
        assert at.query_params["runs"] == run.key, "the address bar keeps the tab's runs"
    assert RunStore(folder).get(run.key).records == run.records, "the finished run is in the store"

    link = share_links(a)[0]
    from urllib.parse import parse_qsl, urlparse
    q = dict(parse_qsl(urlparse(link).query))
    # a server restart: a new RunManager (no worker, nothing in memory) on the same store
    session.manager.clear()
    mgr = session.manager()
    mgr._store = RunStore(folder)
    c = lab(q)
    clean(c)
    opened = c.session_state["_tr_history"]
    assert [r.key for r in opened] == [run.key] and opened[0].stored
    assert [r["loss"] for r in opened[0].records] == [r["loss"] for r in run.records]
    assert "Compare runs" in _results(c) and any("Stored run" in s.value for s in c.success)
    assert loss_points(loss_chart(c)) == 25, "the link opens the loss curve"
    # the router charts (plotly) render when their expander opens: a fresh browser draws the loss curve first
    assert not c.get("plotly_chart")
    c.session_state[f"tr_router_{opened[0].id}"] = True
    c.run()
    titles = [json.loads(ch.proto.spec)["layout"]["title"]["text"] for ch in c.get("plotly_chart")]
    assert any("MaxVio" in t for t in titles) and any("domains" in t for t in titles), titles
    assert mgr.active is None and mgr._seq == 0, "opening a link submits no training job"

    # a reload of a's tab: a fresh session with a's address bar gets a's runs back
    d = lab(dict(a.query_params))
    assert [r.key for r in d.session_state["_tr_history"]] == [run.key]

    # Start on knobs with a stored run: shown at once, marked, with "Train again"
    e = lab(TINY)
    e.button(key="tr_start").click().run()
    clean(e)
    shown = run_of(e)
    assert shown.stored and shown.key == run.key and mgr.active is None and mgr._seq == 0
    assert any("Stored run" in s.value for s in e.success)
    e.button(key=f"tr_again_{shown.id}").click().run()
    again = run_of(e)
    assert again is not shown and not again.stored and again.key == run.key and mgr.active is again
    # a tab with results of its own while another run trains: the watch view and its results share one layer knob
    d.run()
    clean(d)
    assert any("Watching another user's run" in p.proto.text for p in d.get("progress"))
    assert "Compare runs" in _results(d)
    _drain(mgr)


def test_corrupt_store_is_survived_and_the_lab_trains(idle_server, tmp_path):  # noqa: F811
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "runs.sqlite").write_bytes(b"garbage, not SQLite" * 100)
    idle_server._store = RunStore(folder)
    at = lab(TINY)
    clean(at)
    assert any("run store is unavailable" in c.value and "damaged" in c.value for c in at.caption)
    at.button(key="tr_start").click().run()
    clean(at)
    run = run_of(at)
    assert run is not None and idle_server.active is run, "the lab trains as without a store"
    poll_until(at, lambda: not run.active)
    at.run()
    clean(at)
    assert run.status == "done" and run.saved is False and "Compare runs" in _results(at)


def test_bad_and_unknown_run_ids_are_messages(idle_server):  # noqa: F811
    at = lab({"runs": "../etc"})
    clean(at)
    assert any("is not a run id" in e.value and "16 hexadecimal digits" in e.value for e in at.error)
    at = lab({**TINY, "runs": "0123456789abcdef"})
    clean(at)
    assert any("has not stored" in w.value and "0123456789abcdef" in w.value for w in at.warning)
    assert run_of(at) is None and idle_server.active is None


def test_queue_shows_position_and_wait_and_a_viewer_cannot_stop_the_others_run(idle_server):  # noqa: F811
    a = lab(LONG)
    a.button(key="tr_start").click().run()
    run = run_of(a)
    b = lab(TINY)
    b.button(key="tr_start").click().run()
    assert run_of(b) is None, "different knobs: refused while busy, as before"
    b.button(key="tr_queue").click().run()
    queued = run_of(b)
    assert queued.status == "queued"
    info = " ".join(i.value for i in b.info)
    assert "#1 in the queue" in info and "in about" in info, info
    assert idle_server.wait_estimate(queued) > 0
    c = lab(LONG)
    c.button(key="tr_start").click().run()
    assert run_of(c) is run and len(idle_server.queue) == 1, "same knobs as the running run: joined, not queued"
    a.button(key="tr_stop").click().run()
    assert run.active and run_of(a) is None, "a's Stop only stops a following the run"
    assert any("other tab(s) follow it" in i.value for i in a.info)
    c.button(key="tr_stop").click().run()
    poll_until(c, lambda: not run.active, timeout=30)
    assert run.status == "stopped"
    _drain(idle_server)


def test_a_lesson_step_keeps_the_students_own_knobs(idle_server):  # noqa: F811
    at = lab()
    at.radio(key="tr_attn").set_value("mha").run()
    at.select_slider(key="tr_steps").set_value(50).run()
    at.switch_page("pages/lessons.py").run()
    at.radio(key="ls_sec").set_value("Putting it together").run()
    at.select_slider(key="ls_step").set_value(2).run()  # "Balancing matters: turn it off"
    at.button(key="ls_open").click().run()
    clean(at)
    # the step's own view: its knob, every other lab knob at the default
    assert at.radio(key="tr_bal").value == "none"
    assert at.radio(key="tr_attn").value == "mla" and at.select_slider(key="tr_steps").value == APP_DEFAULT.steps
    assert any("Lesson step view" in i.value for i in at.info)
    at.switch_page("pages/training.py")  # (AppTest reruns the page it was told; the app switched to the lab)
    at.button(key="tr_own_knobs").click().run()
    clean(at)
    assert at.radio(key="tr_attn").value == "mha" and at.select_slider(key="tr_steps").value == 50
    assert at.radio(key="tr_bal").value == "aux_free"
    # turning lesson mode off also brings them back
    at.switch_page("pages/lessons.py").run()
    at.button(key="ls_open").click().run()
    assert at.radio(key="tr_attn").value == "mla"
    at.switch_page("pages/training.py")
    at.toggle(key="lesson").set_value(False).run()
    clean(at)
    assert at.radio(key="tr_attn").value == "mha" and at.select_slider(key="tr_steps").value == 50


def test_a_run_cut_by_the_time_cap_is_kept_as_a_partial_run(idle_server, tmp_path, monkeypatch):  # noqa: F811
    from app.lab import knobs
    folder = tmp_path / "store"
    # a cap no step fits in: the run stops after its first step, whatever this machine's speed
    monkeypatch.setattr(knobs, "MAX_SECONDS", 1e-3)
    a = lab(TINY)
    a.button(key="tr_start").click().run()
    cut = run_of(a)
    poll_until(a, lambda: not cut.active)
    a.run()
    clean(a)
    assert cut.status == "time limit" and len(cut.records) == 1
    assert cut.partial_id and cut.partial_id != cut.key and cut.saved
    store = RunStore(folder)
    part = store.get(cut.partial_id)
    assert part.partial and part.full_id == cut.key and part.status == "time limit" and len(part.records) == 1
    assert store.get(cut.key) is None, "the knobs' own id does not name a cut run"
    assert a.query_params["runs"] == cut.partial_id, "the tab keeps it for a reload"
    link = share_links(a)[0]
    assert f"runs={cut.partial_id}" in link

    # its link after a server restart: opened from the store, labelled, with a button for the full run
    from urllib.parse import parse_qsl, urlparse
    monkeypatch.setattr(knobs, "MAX_SECONDS", HANG_S)  # the server's cap again: the full run fits
    session.manager.clear()
    mgr = session.manager()
    mgr._store = RunStore(folder)
    c = lab(dict(parse_qsl(urlparse(link).query)))
    clean(c)
    opened = c.session_state["_tr_history"]
    assert [r.partial_id for r in opened] == [cut.partial_id] and opened[0].key == cut.key and opened[0].stored
    assert any("Partial run" in w.value and "stopped at step 1 of 25 by the time cap" in w.value for w in c.warning)
    assert mgr._seq == 0 and mgr.active is None, "opening the link trains nothing"

    # a Start on the same knobs never shows the partial run: it trains the full run
    e = lab(TINY)
    e.button(key="tr_start").click().run()
    full = run_of(e)
    assert not full.stored and mgr.active is full and mgr._seq == 1 and full.key == cut.key
    poll_until(e, lambda: not full.active)
    e.run()
    clean(e)
    assert full.status == "done" and len(full.records) == 25 and full.partial_id is None
    done = RunStore(folder).get(cut.key)
    assert done.status == "done" and not done.partial and len(done.records) == 25, "stored as the finished run"
    assert len(RunStore(folder).get(cut.partial_id).records) == 1, "the partial run keeps its own id"

    # "Train the full run" on the partial view now opens the finished run, with no training
    c.button(key=f"tr_full_{opened[0].id}").click().run()
    clean(c)
    shown = run_of(c)
    assert shown.stored and shown.status == "done" and shown.key == cut.key and shown.partial_id is None
    assert mgr._seq == 1 and any("Stored run" in s.value for s in c.success)


def test_a_stopped_run_is_kept_as_a_partial_run(idle_server, tmp_path):  # noqa: F811
    a = lab(LONG)
    run = stopped_run(a)
    a.run()
    clean(a)
    assert run.status == "stopped" and run.partial_id
    step = run.records[-1]["step"]
    assert run.cut_text() == f"stopped at step {step} of 400 with its Stop button"
    store = RunStore(tmp_path / "store")
    assert store.get(run.partial_id).status == "stopped" and store.get(run.key) is None
    # a reload of the tab brings it back, labelled
    d = lab(dict(a.query_params))
    clean(d)
    assert [r.partial_id for r in d.session_state["_tr_history"]] == [run.partial_id]
    assert any(f"stopped at step {step} of 400 with its Stop button" in w.value for w in d.warning)
    assert idle_server.active is None
