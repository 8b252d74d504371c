"""Debian's `chromium` driven by Python `playwright`, for the browser tests. Never
downloads a browser: it uses `/usr/bin/chromium` (`make install-system` installs it)
and skips when it is absent, except under CI, where that is a broken machine."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def launched(*extra_args: str) -> Iterator[Any]:
    """A headless chromium with `CHROMIUM_ARGS` and `extra_args`, closed at the end."""
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing: run `make install-system` (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One chromium for a test module (import the fixture by name)."""
    with launched() as chromium:
        yield chromium


@contextlib.contextmanager
def persistent(browser: Any, user_data_dir: str) -> Iterator[Any]:
    """A headless chromium context keeping its profile (disk cache included) in
    `user_data_dir`, as a person's browser does, from the playwright that launched
    `browser` (one a thread); closed, and so flushed to disk, at the end."""
    context = browser.browser_type.launch_persistent_context(
        user_data_dir, executable_path=CHROMIUM, args=CHROMIUM_ARGS
    )
    try:
        yield context
    finally:
        context.close()


@contextlib.contextmanager
def watched_page(browser: Any, width: int, height: int) -> Iterator[Any]:
    """A page in a context of its own that fails the test if its script threw. The
    context bypasses the page's Content-Security-Policy: the caller says why."""
    context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def assert_not_blank(browser: Any, png: bytes) -> None:
    """Decode the screenshot in the browser and require real content: many colours and
    a good share of pixels unlike the background."""
    context = browser.new_context()
    try:
        stats = context.new_page().evaluate(
            """async (src) => {
                const img = new Image(); img.src = src; await img.decode();
                const canvas = document.createElement("canvas");
                canvas.width = img.width; canvas.height = img.height;
                const ctx = canvas.getContext("2d"); ctx.drawImage(img, 0, 0);
                const d = ctx.getImageData(0, 0, img.width, img.height).data;
                const colours = new Set(); let unlike = 0;
                for (let i = 0; i < d.length; i += 4) {
                    colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
                    if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1])
                        + Math.abs(d[i + 2] - d[2]) > 24) unlike++;
                }
                return {width: img.width, height: img.height, colours: colours.size,
                        unlike: unlike / (d.length / 4)};
            }""",
            "data:image/png;base64," + base64.b64encode(png).decode(),
        )
    finally:
        context.close()
    assert stats["width"] >= 800 and stats["height"] >= 600, stats
    assert stats["colours"] > 50, f"the screenshot looks blank: {stats}"
    assert stats["unlike"] > 0.05, f"the screenshot looks blank: {stats}"
