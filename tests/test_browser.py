"""The built site in headless Chromium: no errors rendered, images load and have alt text, widgets
respond, no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from clipdecomp.book import repo_root

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = repo_root() / "_build" / "screenshots"


def _pages(html: Path) -> list[Path]:
    skip = {"genindex.html", "search.html"}
    return sorted(p for p in html.rglob("*.html") if p.name not in skip and "_static" not in p.parts)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`); "
            "scripts/test.sh does this when run as root."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


def _open(browser, path: Path):
    """Open a page with every non-local request blocked and recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def guard(route):
        if route.request.url.startswith(("file://", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_timeout(300)
    return page, outside


def test_every_page_renders_cleanly_offline(built_book, browser):
    _, html, _ = built_book
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    pages = _pages(html)
    assert len(pages) >= 3
    for path in pages:
        page, outside = _open(browser, path)
        name = str(path.relative_to(html)).replace("/", "__").removesuffix(".html")
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        text = page.inner_text("body")
        assert "Traceback (most recent call last)" not in text, f"{name}: a Python traceback is rendered"
        assert page.locator(".output.traceback, .output.error").count() == 0, (
            f"{name}: an error output is rendered"
        )
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
        )
        assert not broken, f"{name}: images failed to load: {broken}"
        no_alt = page.evaluate(
            "Array.from(document.images).filter(i => { const alt = (i.getAttribute('alt') || '').trim();"
            " return !alt || i.src.endsWith(alt.split('/').pop()); }).map(i => i.src.slice(0, 90))"
        )
        assert not no_alt, (
            f"{name}: images without alt text (a figure cell needs mystnb.image.alt metadata): {no_alt}"
        )
        assert not outside, f"{name}: requests left the machine: {outside}"
        if page.locator(".math").count():
            assert page.locator("mjx-container").count(), (
                f"{name}: maths did not render (MathJax not served locally?)"
            )
        page.close()


def test_head_explorer_widgets_render_and_respond_offline(built_book, browser):
    _, html, _ = built_book
    page, outside = _open(browser, html / "notebooks" / "08_head_explorer.html")
    page.wait_for_timeout(1000)
    selects = page.locator(".widget-dropdown select")
    assert selects.count() == 3, "the explorer's image/head/text dropdowns did not render"

    def visible(selector: str) -> list[str]:
        return [
            e.inner_text() if selector.endswith("content") else e.get_attribute("src")
            for e in page.locator(selector).all()
            if e.is_visible()
        ]

    summary, pictures = visible(".widget-html-content"), visible(".jupyter-widgets img")
    assert pictures, "the explorer shows no image"
    selects.nth(1).select_option(index=1)  # another head
    page.wait_for_timeout(500)
    assert visible(".widget-html-content") != summary, "choosing another head changed nothing"
    heatmap, strip = visible(".jupyter-widgets img")
    selects.nth(2).select_option(index=1)  # another text: a new heatmap, the same neighbours
    page.wait_for_timeout(500)
    assert visible(".jupyter-widgets img")[0] != heatmap, "choosing another text kept the same heatmap"
    assert not outside, f"requests left the machine: {outside}"
    page.close()
