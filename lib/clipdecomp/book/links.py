"""Check the built site's internal links: every local ``href``/``src`` names a file that exists, and
every ``#fragment`` an element id on the page it points to.

Sphinx's ``-n`` catches broken cross-references in the sources; this catches what reaches the HTML
(raw links in Markdown, theme links, images, assets), offline, with no server. Links that leave the
site (``https:``, ``mailto:``, ...) are not followed: the book must read offline, and its outside
links (Colab, the paper) are checked by a person.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["broken_internal_links"]

_LINK_ATTRIBUTES = {
    "a": "href",
    "link": "href",
    "img": "src",
    "script": "src",
    "iframe": "src",
    "source": "src",
}


class _PageScan(HTMLParser):
    """Collects a page's element ids and its local link targets."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("id", "name"):
            if values.get(name):
                self.ids.add(values[name])
        target = values.get(_LINK_ATTRIBUTES.get(tag, ""))
        if target and not urlsplit(target).scheme and not target.startswith("//"):
            self.links.append(target)


def _scan(path: Path, cache: dict[Path, _PageScan]) -> _PageScan:
    if path not in cache:
        scan = _PageScan()
        scan.feed(path.read_text(encoding="utf-8", errors="replace"))
        cache[path] = scan
    return cache[path]


def broken_internal_links(html_dir: str | Path) -> list[str]:
    """``"page -> link (why)"`` for each broken local link under ``html_dir``; empty when all resolve."""
    html_dir = Path(html_dir).resolve()
    cache: dict[Path, _PageScan] = {}
    broken = []
    pages = [p for p in sorted(html_dir.rglob("*.html")) if "_static" not in p.relative_to(html_dir).parts]
    for page in pages:  # _static holds the theme's Jinja templates, not pages
        for link in _scan(page, cache).links:
            parts = urlsplit(link)
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(html_dir)} -> {link}"
            if not target.is_relative_to(html_dir):
                broken.append(f"{where} (points outside the site)")
            elif not target.is_file():
                broken.append(f"{where} (no such file)")
            elif (
                parts.fragment
                and target.suffix == ".html"
                and unquote(parts.fragment) not in _scan(target, cache).ids
            ):
                broken.append(f"{where} (no element with id {parts.fragment!r})")
    return broken
