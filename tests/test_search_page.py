"""The search page in a real browser (Debian's headless chromium, driven by Playwright): type a query over
generated videos whose captions are known, see the expected video first, click it, and check the player
starts at the best frame's time; also the loopback load test of the served API (50 clients for 10 s)."""

import concurrent.futures
import os
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from cma_jax.search import serve
from test_search import caption, trained  # noqa: F401  (the module's trained model)
from test_search_serve import served  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.environ.get("SEARCH_PAGE_SCREENSHOT")  # where to keep the page's picture, if anywhere


@pytest.fixture(scope="module")
def server(served):  # noqa: F811
    """The app on a loopback port, in a thread: (base URL, served indexes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(serve.make_app(served["served"]), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", served
    srv.should_exit = True
    thread.join(10)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_type_see_click_and_play_at_the_best_moment(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, served = server  # noqa: F811
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       args=CHROMIUM_ARGS, headless=True,
                                                       viewport={"width": 1180, "height": 720})  # a fresh profile
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#index option", state="attached")
            page.select_option("#index", "cma")
            page.fill("#q", "")
            page.type("#q", caption("red"), delay=20)  # typed: the debounce sends one query, the last
            page.wait_for_function("document.querySelectorAll('.hit').length === 8")
            cards = page.eval_on_selector_all(".hit", "cs => cs.map(c => [c.dataset.video, +c.dataset.time])")
            assert cards[0][0] in ("red.mp4", "escape.mp4", "moments.mp4")  # videos showing red
            moments = dict(cards)["moments.mp4"]
            assert moments == 2.0  # red is its third second
            page.click(".hit[data-video='moments.mp4']")
            page.wait_for_function("document.querySelector('#player').dataset.startedAt !== ''", timeout=20000)
            started = float(page.eval_on_selector("#player", "p => p.dataset.startedAt"))
            assert abs(started - moments) < 0.05, started
            assert page.eval_on_selector("#playerror", "e => e.hidden")
            # A video deleted after indexing: a message instead of a broken player.
            page.click(".hit[data-video='doomed.mp4']")
            assert page.inner_text("#playerror") == ("doomed.mp4 was deleted or moved since it was indexed: "
                                                     "nothing to play.")
            page.click(".hit[data-video='moments.mp4']")
            page.wait_for_function("document.querySelector('#player').dataset.startedAt !== ''", timeout=20000)
            page.wait_for_function("[...document.images].every(i => !i.src || i.complete)")
            shot = tmp_path / "search_page.png"
            page.screenshot(path=str(shot))
            if SCREENSHOT:
                shutil.copy(shot, SCREENSHOT)
            # An error from the API shows in the status line.
            page.fill("#q", "a red video of a red video")
            page.wait_for_selector("#status.error")
            assert "query too long" in page.inner_text("#status")
            # A long file name wraps inside its card, which stays in line with the others.
            long = "holiday_2019_beach_sunset_with_family_and_friends_full_length_original_upload.mp4"

            def renamed(route):
                data = route.fetch().json()
                data["hits"][1]["video"] = long
                route.fulfill(json=data)

            page.route("**/api/search*", renamed)
            page.fill("#q", caption("blue"))
            page.wait_for_function(f"[...document.querySelectorAll('.hit')].some(c => c.dataset.video === {long!r})")
            cards = page.eval_on_selector_all(".hit", """cs => cs.map(c => [c.getBoundingClientRect().top,
                c.firstElementChild.getBoundingClientRect().top, c.getBoundingClientRect().width,
                c.scrollWidth <= c.clientWidth, c.querySelector('.name').title])""")
            row = [c for c in cards if c[0] == cards[0][0]]
            assert len(row) >= 3 and cards[1][4] == long
            assert len({c[1] for c in row}) == 1 and len({c[2] for c in row}) == 1  # pictures in line, same widths
            assert all(c[3] for c in cards)  # nothing sticks out of its card
        finally:
            browser.close()


@pytest.mark.slow
def test_fifty_clients_for_ten_seconds_are_all_answered_right(server, capsys):
    """A bounded loopback load test: 50 concurrent clients query for 10 s; every answer is checked."""
    base, _ = server
    queries = {caption(c): f"{c}.mp4" for c in ("yellow", "purple")}
    deadline = time.time() + 10.0

    def client(i):
        latencies, wrong = [], []
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.time() < deadline:
                q = list(queries)[i % 2]
                start = time.perf_counter()
                r = c.get("/api/search", params={"q": q, "index": "cma", "k": 3})
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200 or r.json()["hits"][0]["video"] != queries[q]:
                    wrong.append((r.status_code, r.text[:200]))
        return latencies, wrong

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(client, range(50)))
    latencies = np.concatenate([r[0] for r in results]) * 1000
    wrong = [w for r in results for w in r[1]]
    assert not wrong, wrong[:3]
    assert all(len(r[0]) > 0 for r in results)  # every client got answers
    with capsys.disabled():
        print(f"\nload test: {len(latencies)} requests from 50 clients in 10 s, all answered and right; latency "
              f"p50 {np.percentile(latencies, 50):.0f} ms, p95 {np.percentile(latencies, 95):.0f} ms, "
              f"max {latencies.max():.0f} ms")
