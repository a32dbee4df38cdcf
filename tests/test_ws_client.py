"""The websocket client of the classroom load test (bench/ws_client.py, `bench/classroom.py --client ws`) against a
live server: a tab opens the lab from a link with a 25-step run's knobs, finds Start by its widget id, clicks it,
follows the live fragment's reruns to the results; a second tab pressing Start on the same knobs gets the stored
run at once. No timing is asserted: every wait ends on what the page shows (or fails after HANG_S).
"""
from __future__ import annotations

import asyncio
import re
import sys
import tempfile
from pathlib import Path

from apptest_helpers import HANG_S
from live_server import LiveServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from classroom import page_outcome, results_seen  # noqa: E402
from ws_client import Tab  # noqa: E402

QUERY = {"tr_steps": "25", "tr_batch": "4", "tr_seq": "32"}


async def _start_until_results(base: str) -> tuple[Tab, str, int]:
    tab = Tab(base, "training", QUERY)
    await tab.open(HANG_S)
    assert tab.button("tr_start").label == "Start training"
    await tab.click("tr_start", HANG_S)
    outcome = page_outcome(tab.texts())
    while not results_seen(tab) and not tab.closed:
        await tab.wait_change(HANG_S)
    return tab, outcome, results_seen(tab) or 0


async def _scenario(base: str) -> dict:
    first, out1, pts1 = await _start_until_results(base)
    await first.close()
    second, out2, pts2 = await _start_until_results(base)
    texts = second.texts()
    await second.close()
    return {"first": (out1, pts1, first.errors), "second": (out2, pts2, second.errors), "texts": texts}


def test_ws_tab_starts_a_run_sees_results_and_a_second_tab_gets_it_stored(tmp_path):
    with LiveServer(log_path=tmp_path / "server.log", start_timeout=HANG_S,
                    env={"EVA_DATA_DIR": tempfile.mkdtemp(prefix="eva-ws-test-")}) as server:
        r = asyncio.run(_scenario(server.base))
    out1, pts1, err1 = r["first"]
    assert err1 == [] and out1 == "started"
    assert pts1 == 25, "the results' loss curve has every step"
    out2, pts2, err2 = r["second"]
    assert err2 == [] and out2 == "stored" and pts2 == 25
    line = next(t for t in r["texts"] if t.startswith("This server has trained"))
    assert re.search(r"trained 1 run\(s\)", line), line
