"""First token on the demo page under ``llm-gateway dev`` (issue 14's target: ≤ 15 ms
with the mock and no delay), measured the way a user feels it: the page's own
"first token N ms" (from Send to the first token on screen), in headless Chromium.

Starts ``llm-gateway dev`` in a scratch directory (SQLite, in-memory store), signs
in as the demo user and sends `--n` one-line questions to ``mock-fast``, then prints
each time and their median. Beside it, the same turn without a browser (httpx: the
init, then the stream up to its first ``chunk``), to split the time between the two.

    python -m bench.demo_first_token --n 10
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def free_port_base() -> int:
    """Three free ports in a row (dev takes port_base .. port_base + 2)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + 2 < 65536 and all(_free(base + i) for i in (1, 2)):
            return base
    raise RuntimeError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ready(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def browser_times(cp: str, n: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(f"{cp}/")
        page.click("#login-form button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "mock-fast")
        for i in range(n + 1):  # the first turn warms the page and the servers up
            page.fill("#query", f"Hello {i}")
            page.click("#send")
            page.wait_for_function(
                "[...document.querySelectorAll('.meta')].some(m => m.dataset.settled)"
                f" && document.querySelectorAll('.meta[data-settled]').length > {i}"
            )
            metas = page.locator(".meta[data-settled]").all_text_contents()
            found = re.search(r"first token (\d+) ms", metas[-1])
            if found and i > 0:
                times.append(float(found.group(1)))
        browser.close()
    return times


def direct_times(cp: str, n: int) -> list[tuple[float, float]]:
    """(init ms, stream-to-first-chunk ms) per turn, over HTTP without a browser."""
    out = []
    with httpx.Client(base_url=cp, timeout=10) as client:
        login = {"email": "demo@example.com", "password": "demo"}
        token = client.post("/v1/auth/login", json=login).json()["data"]["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        for i in range(n + 1):
            t0 = time.perf_counter()
            r = client.post(
                "/v1/chat/init", json={"query": f"hi {i}", "model": "mock-fast"}, headers=auth
            )
            t1 = time.perf_counter()
            grant = r.json()["data"]
            with client.stream("GET", grant["stream_url"]) as stream:
                lines = stream.iter_lines()
                for line in lines:
                    if line.startswith("event: chunk"):
                        break
                t2 = time.perf_counter()
                for _ in lines:
                    pass
            if i > 0:
                out.append(((t1 - t0) * 1000, (t2 - t1) * 1000))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args(argv)
    base = free_port_base()
    cp = f"http://127.0.0.1:{base}"
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "dev.log", "wb") as log:
        env = {**os.environ, "PYTHONPATH": str(root), "LLMGW_LOG_LEVEL": "WARNING"}
        command = [sys.executable, "-m", "llm_gateway.cli", "dev", "--port-base", str(base)]
        server = subprocess.Popen(
            command, cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            try:
                wait_ready(cp, time.monotonic() + 60)
            except RuntimeError:
                print((Path(scratch) / "dev.log").read_text()[-3000:], file=sys.stderr)
                raise
            direct = direct_times(cp, args.n)
            page = browser_times(cp, args.n)
        finally:
            server.terminate()
            server.wait(timeout=30)
    inits = [a for a, _ in direct]
    firsts = [b for _, b in direct]
    print(
        f"demo page first token: median {statistics.median(page):.0f} ms "
        f"(min {min(page):.0f}, max {max(page):.0f}, n={len(page)})"
    )
    print(
        f"without a browser: init median {statistics.median(inits):.1f} ms, "
        f"stream to first chunk median {statistics.median(firsts):.1f} ms"
    )


if __name__ == "__main__":
    main()
