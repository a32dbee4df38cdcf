"""Share-link bench (issue 17): how long a fresh browser takes to show a stored run from its link.

    python bench/share_link.py [--repeats 5]

Starts a live server on an empty run store, trains one 25-step run in Chromium (Debian's, through Playwright), copies
its share link, then opens it `--repeats` times, each in a fresh browser context (no cache, no cookies, no session:
a colleague who got the link), and times from `goto` to the results ("Compare runs") with the whole loss curve drawn
(every train-loss point, read from the drawn chart as tests/test_e2e_training.py does). Reference, measured in the
same run and interleaved with the links: the lab page without a link in a fresh context, until its script has
finished and its text is complete — what any first visit to the lab costs on this machine at this moment. Prints
the medians, their ratio and the load average (the box is shared: compare within one run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from tests.live_server import LiveServer  # noqa: E402
from test_e2e_training import _POINTS_JS  # noqa: E402  (the e2e test's reading of the drawn loss curve)

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
QUERY = "tr_steps=25&tr_batch=4&tr_seq=32"


def _points(page) -> int:
    return int(page.evaluate(_POINTS_JS))


def train_and_link(browser, base: str) -> str:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{base}/training?{QUERY}")
    page.wait_for_selector(IDLE, timeout=180_000)
    page.get_by_role("button", name="Start training").click()
    page.get_by_role("heading", name="Compare runs").wait_for(timeout=300_000)
    page.get_by_text("Links to this run").click()
    link = page.get_by_test_id("stCode").filter(has_text="runs=").first.inner_text().strip()
    page.close()
    return link


def open_fresh(browser, url: str, done) -> float:
    """Seconds from goto to done(page) in a fresh context (polled every 50 ms, as the e2e test polls)."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    while not done(page):
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"{url} did not finish in 120 s")
        page.wait_for_timeout(50)
    t = time.perf_counter() - t0
    ctx.close()
    return t


# one cheap in-page check per poll (role and text locators walk the accessibility tree: costly on this page)
_HEADING_JS = "(t) => [...document.querySelectorAll('h1,h2,h3')].some(h => h.textContent.includes(t))"
_LAB_JS = (f"() => !!document.querySelector(\"{IDLE}\") && [...document.querySelectorAll('button')]"
           ".some(b => b.textContent.includes('Start training')) && document.body.innerText.includes('Preset')")


def link_done(page) -> bool:
    return page.evaluate(_HEADING_JS, "Compare runs") and _points(page) >= 25


def lab_done(page) -> bool:
    return page.evaluate(_LAB_JS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chrome:
        sys.exit("needs Debian's chromium (apt-get install -y chromium); never `playwright install`")
    with LiveServer(env={"EVA_DATA_DIR": tempfile.mkdtemp(prefix="eva-share-bench-")}) as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chrome, args=["--disable-background-networking",
                                                                   "--disable-component-update", "--disable-sync"])
        link = train_and_link(browser, server.base)
        open_fresh(browser, link, link_done)  # warm the server's side (store read, figures) once, as a class would
        links, labs, loads = [], [], []
        for _ in range(args.repeats):
            links.append(open_fresh(browser, link, link_done))
            labs.append(open_fresh(browser, f"{server.base}/training", lab_done))
            loads.append(os.getloadavg()[0])
        browser.close()
    ml, mr = statistics.median(links), statistics.median(labs)
    print(f"share link, fresh context, to results + whole loss curve: median {ml:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in links)})")
    print(f"reference: the lab page without a link, fresh context, to its complete text: median {mr:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in labs)})")
    print(f"ratio {ml / mr:.2f}; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores "
          f"(target: the link within 3 s)")


if __name__ == "__main__":
    main()
