"""A browser tab without a browser: one Streamlit websocket session driven from asyncio (bench/classroom.py
`--client ws`, tests/test_ws_client.py).

    tab = Tab(server.base, "training", {"tr_steps": "25"})
    await tab.open()                    # connect, first script run of the page, wait until it has finished
    await tab.click("tr_start")         # the button's trigger value, as the frontend sends it; waits for the run
    tab.texts(), tab.charts(), tab.headings()   # what the last finished full run drew
    await tab.close()

What it does as the frontend does (frontend/app/src/App.tsx, frontend/lib/src/WidgetStateManager.ts of
streamlit/streamlit), so that the server does the work it does for a real tab:
- connects to `/_stcore/stream` with the `streamlit` subprotocol and asks for the page's first run with a
  `rerun_script` BackMsg (`page_name` = the URL path, the query string of the link);
- a click is a `rerun_script` whose widget states hold the button's `trigger_value`;
- `auto_rerun` ForwardMsgs (an `st.fragment(run_every=...)`) start a timer that sends a fragment rerun
  (`fragment_id`, `is_auto_rerun`) at that interval; a full run's `new_session` clears the timers, as do
  `stop_auto_rerun` messages; a server-side `st.rerun(scope="app")` simply arrives as a new full run;
- `navigation` (st.navigation) names the page the next reruns ask for by its hash, `page_info_changed` updates
  the query string they carry (the address bar);
- cacheable messages are kept by hash (until unused for `global.maxCachedMessageAge` full runs) and their
  hashes sent with each rerun, so the server answers with `ref_hash` references as it does to a browser.
What it leaves out: rendering, and the widget states of untouched widgets (the frontend sends every widget's
value with each rerun; the server then keeps the same values, so only its parsing of them is missing).
"""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlencode

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

FULL_DONE = (ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR)


class Tab:
    """One tab on `page` (a url path, "" for the main page) of the server at `base`, opened with `query`."""

    def __init__(self, base: str, page: str, query: dict | str = "", on_text=None):
        self.ws_url = base.replace("http", "ws", 1) + "/_stcore/stream"
        self.origin = base
        self.page = page
        self.query = query if isinstance(query, str) else urlencode(query)
        self.on_text = on_text            # called with each alert / markdown body as it arrives (also in fragments)
        self.page_hash = ""
        self.ws = None
        self._reader = None
        self._timers: dict[str, asyncio.Task] = {}
        self._cache: dict[str, tuple] = {}          # hash -> (message, full run that last used it)
        self._runs = 0                              # full runs started (the cache's clock)
        self._max_age = 2                           # global.maxCachedMessageAge, from new_session
        self._building: dict[tuple, object] = {}   # delta path -> Element of the run in progress
        self._full = True                           # the run in progress is a full run (not a fragment's)
        self._early = False                         # the last fragment run ended early
        self.elements: dict[tuple, object] = {}    # what the page shows after the last finished run
        self.full_runs = 0                          # full runs finished
        self.fragment_runs = 0                      # fragment runs finished
        self.interrupted = 0                        # fragment runs the server ended early for a newer request
        self.errors: list[str] = []                 # exception elements, a lost connection
        self.closed = False
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ connection
    async def open(self, timeout: float = 300.0) -> None:
        import websockets
        self.ws = await websockets.connect(self.ws_url, subprotocols=["streamlit"], origin=self.origin,
                                           max_size=None, open_timeout=timeout, ping_interval=None)
        self._reader = asyncio.create_task(self._read())
        n = self.full_runs
        await self.rerun()
        await self.wait_full(n, timeout)

    async def close(self) -> None:
        self.closed = True
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()

    async def rerun(self, widgets: list | None = None, fragment_id: str = "", auto: bool = False) -> None:
        """A `rerun_script` BackMsg: the page by hash once the server has named it, else by its URL path."""
        msg = BackMsg()
        cs = msg.rerun_script
        cs.query_string = self.query
        cs.page_script_hash = self.page_hash
        if not self.page_hash:
            cs.page_name = self.page
        if fragment_id:
            cs.fragment_id = fragment_id
            cs.is_auto_rerun = auto
        cs.widget_states.widgets.extend(widgets or [])
        cs.cached_message_hashes.extend(self._cache)
        await self.ws.send(msg.SerializeToString())

    async def click(self, key: str, timeout: float = 300.0) -> None:
        """Press the button whose widget key is `key` (KeyError when the page has none) and wait for the full run
        it starts to finish."""
        wid = self.button(key).id
        n = self.full_runs
        await self.rerun([WidgetState(id=wid, trigger_value=True)])
        await self.wait_full(n, timeout)

    async def wait_full(self, n: int, timeout: float) -> None:
        """Until more than `n` full runs have finished (TimeoutError after `timeout` s)."""
        end = time.monotonic() + timeout
        while self.full_runs <= n:
            if self.closed:
                raise ConnectionError("the websocket closed: " + "; ".join(self.errors[-2:]))
            await self.wait_change(end - time.monotonic())

    async def wait_change(self, timeout: float) -> None:
        """Until the next run (full or fragment) finishes; TimeoutError after `timeout` s."""
        self._changed.clear()
        await asyncio.wait_for(self._changed.wait(), max(0.0, timeout))

    # ------------------------------------------------------------------ messages
    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, (bytes, bytearray)):
                    m = ForwardMsg()
                    m.ParseFromString(frame)
                    await self._handle(m)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a lost connection (server gone, protocol error)
            if not self.closed:
                self.errors.append(f"websocket: {type(e).__name__}: {str(e)[:160]}")
        if not self.closed:
            self.errors.append("websocket closed by the server")
        self.closed = True
        self._changed.set()

    async def _handle(self, m: ForwardMsg) -> None:
        kind = m.WhichOneof("type")
        if kind == "ref_hash":  # the server sent this message before: take its body from the cache
            cached = self._cache.get(m.ref_hash)
            if cached is None:
                self.errors.append(f"ref_hash {m.ref_hash} not in the client cache")
                return
            self._cache[m.ref_hash] = (cached[0], self._runs)
            body = ForwardMsg()
            body.CopyFrom(cached[0])
            body.metadata.CopyFrom(m.metadata)
            m, kind = body, body.WhichOneof("type")
        elif m.metadata.cacheable and m.hash:
            self._cache[m.hash] = (m, self._runs)
        if kind == "new_session":
            ns = m.new_session
            self._full = not m.metadata.run.fragment_ids
            self.interrupted += self._early and not self._full
            self._early = False
            if self._full:  # a full run (also one the app asked for with st.rerun): the timers start again
                for t in self._timers.values():
                    t.cancel()
                self._timers.clear()
                self._building = {}
                self._max_age = ns.config.max_cached_message_age or self._max_age
                self._runs += 1
                self._cache = {h: v for h, v in self._cache.items() if self._runs - v[1] <= self._max_age}
            else:
                self._building = dict(self.elements)
        elif kind == "delta":
            d = m.delta
            if d.WhichOneof("type") == "new_element":
                el = d.new_element
                self._building[tuple(m.metadata.delta_path)] = el
                which = el.WhichOneof("type")
                if which == "exception":
                    self.errors.append(f"exception element: {el.exception.type}: {el.exception.message[:160]}")
                elif which in ("alert", "markdown") and self.on_text is not None:
                    self.on_text(getattr(el, which).body)
        elif kind == "auto_rerun":
            fid, every = m.auto_rerun.fragment_id, m.auto_rerun.interval
            if fid not in self._timers:
                self._timers[fid] = asyncio.create_task(self._every(fid, every))
        elif kind == "stop_auto_rerun":
            for fid in m.stop_auto_rerun.fragment_ids:
                t = self._timers.pop(fid, None)
                if t is not None:
                    t.cancel()
        elif kind == "navigation":  # st.navigation: the page this run shows (new_session names the entry point)
            self.page_hash = m.navigation.page_script_hash or self.page_hash
        elif kind == "page_info_changed":
            self.query = m.page_info_changed.query_string
        elif kind == "script_finished":
            if m.script_finished in FULL_DONE and self._full:
                self.elements = self._building
                self.full_runs += 1
            elif m.script_finished == ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY:
                self.elements = self._building
                self.fragment_runs += 1
            elif m.script_finished == ForwardMsg.FINISHED_EARLY_FOR_RERUN and not self._full:
                self._early = True  # counted when the next run is a fragment's (not the app's st.rerun)
            self._changed.set()

    async def _every(self, fragment_id: str, seconds: float) -> None:
        """The frontend's setInterval for an `auto_rerun`: a fragment rerun every `seconds`, whatever else runs."""
        try:
            while not self.closed:
                await asyncio.sleep(seconds)
                await self.rerun(fragment_id=fragment_id, auto=True)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the socket went away between two ticks
            if not self.closed:
                self.errors.append(f"fragment rerun: {type(e).__name__}: {str(e)[:120]}")

    # ------------------------------------------------------------------ what the page shows
    def _of(self, which: str) -> list:
        return [getattr(el, which) for _, el in sorted(self.elements.items()) if el.WhichOneof("type") == which]

    def button(self, key: str):
        """The Button proto of the widget with key `key` (its id ends with the key)."""
        for b in self._of("button"):
            if b.id.endswith("-" + key):
                return b
        raise KeyError(f"no button with key {key!r} on the page")

    def headings(self) -> list[str]:
        return [h.body for h in self._of("heading")]

    def texts(self) -> list[str]:
        """Alert and markdown bodies (st.info / warning / success / error, captions, markdown), in page order."""
        return [getattr(el, el.WhichOneof("type")).body for _, el in sorted(self.elements.items())
                if el.WhichOneof("type") in ("alert", "markdown")]

    def charts(self) -> dict[str, dict]:
        """Plotly figures by element id: {id: figure dict}."""
        return {c.id: json.loads(c.spec) for c in self._of("plotly_chart")}

    def vega_charts(self) -> list[tuple[dict, list]]:
        """Vega-Lite charts in page order: (spec dict, [DataFrame of each dataset]) each (the lab's loss curve). They
        carry no element id (Streamlit sets one only on charts with selections): tell them apart by their titles."""
        from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
        return [(json.loads(c.spec), [convert_arrow_bytes_to_pandas_df(d.data.data) for d in c.datasets])
                for c in self._of("vega_lite_chart")]


def series_points(chart: tuple[dict, list], series: str) -> int:
    """Rows of one series (the `series` column) in a Vega-Lite chart of `Tab.vega_charts`."""
    return sum(int((df["series"] == series).sum()) for df in chart[1] if "series" in df)


def trace_points(fig: dict, i: int = 0) -> int:
    """Points of trace `i` of a plotly figure dict (a list, or plotly's typed array {dtype, bdata})."""
    data = fig.get("data") or []
    if len(data) <= i:
        return 0
    x = data[i].get("x")
    if isinstance(x, dict) and "bdata" in x:
        import base64

        import numpy as np
        return len(base64.b64decode(x["bdata"])) // np.dtype(x["dtype"]).itemsize
    return len(x or [])
