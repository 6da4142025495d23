"""Open a local HTML file in headless Chromium (Debian's, installed by `make browser`) through
Playwright, recording every request that is not the file itself or an inline data URI."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@contextmanager
def open_page(path: Path) -> Iterator[tuple[object, list[str]]]:
    """(page, outside) where `outside` collects URLs the page tried to fetch from elsewhere
    (they are aborted, so a page that needs the network renders broken and the test sees it)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail("chromium is not installed: run `make browser` (CI does it through `make test`)")
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def route(r) -> None:
        url = r.request.url
        if url.startswith(("file://", "data:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.route("**/*", route)
            page.goto(path.resolve().as_uri(), wait_until="load")
            yield page, outside
        finally:
            browser.close()
