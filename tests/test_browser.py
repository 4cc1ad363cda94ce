"""The built HTML renders offline: math, mermaid diagrams, figures, widgets, Colab links, Chinese terms.

Serves the built book (``_build/html``, or ``$LIGHTLM_HTML_DIR``) on 127.0.0.1 and renders the pages that
need JavaScript in Debian's headless Chromium, one process per page, a few at a time. Every host name but
127.0.0.1 is made unresolvable, so anything still loaded from a CDN fails here as it would offline.

The Chinese terms of the prose (知识蒸馏, ...) are checked through Chromium's DevTools protocol, spoken over
``--remote-debugging-pipe`` (no websocket, no new dependency): it names the platform font that drew each glyph,
which must be one that fontconfig lists for Chinese, not a fallback drawing empty boxes.

Without Chromium, a built book or a Chinese font these tests skip and say how to get them; with
LIGHTLM_REQUIRE_BROWSER=1 (CI sets it) they fail instead.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
import posixpath
import re
import select
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
COLAB_PREFIX = "https://colab.research.google.com/github/"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# What MathJax leaves untouched is what it skips (and what a reader sees as code, not math).
NOT_PROSE = {"script", "style", "noscript", "template", "textarea", "pre", "code", "head", "mjx-container"}
RAW_TEX = ("$$", "\\[", "\\(", "\\begin{")
# Pages Sphinx writes that are not the book's content.
NOT_CONTENT = {"genindex.html", "search.html", "py-modindex.html"}
# Every Chromium these tests start: headless, offline (every host name but the local server's is made
# unresolvable, so anything still loaded from a CDN fails here as it would for a reader without network).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1200,900",
)
VIRTUAL_TIME_MS = 10_000  # virtual: Chromium fast-forwards idle time, so this costs far less in real time
PAGE_TIMEOUT_S = 90


# --------------------------------------------------------------------------------------------------------
# A small DOM: the standard library's HTMLParser builds the tree (no new dependency).

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
        "track", "wbr"}


class Node:
    __slots__ = ("tag", "attrs", "children", "parent")

    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.children, self.parent = tag, attrs, [], parent

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def visible_text(self) -> str:
        if self.tag in NOT_PROSE:
            return ""
        return "".join(c if isinstance(c, str) else c.visible_text() for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:  # an end tag with no open element is ignored, as browsers do
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse_html(text: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(text)
    builder.close()
    return builder.root


# --------------------------------------------------------------------------------------------------------
# Fixtures: the built book, a local server, Chromium, and the rendered pages.

def _unavailable(reason: str):
    if os.environ.get("LIGHTLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (LIGHTLM_REQUIRE_BROWSER=1, so this fails instead of skipping)")
    pytest.skip(reason)


@dataclass(repr=False)
class Page:
    rel: str  # path relative to the site root, with "/"
    static: Node  # the HTML as built
    rendered: Node | None = None  # the DOM after Chromium ran its scripts (pages that need it)
    console: list[str] = field(default_factory=list)  # what the page logged (for failure messages)
    error: str = ""  # why it could not be rendered

    def __repr__(self) -> str:
        return f"Page({self.rel!r})"

    @property
    def has_math(self) -> bool:
        return bool(self.static.find_all(cls="math"))

    @property
    def has_mermaid(self) -> bool:
        return bool(self.static.find_all(cls="mermaid"))

    @property
    def has_widget_state(self) -> bool:
        return any(s.attrs.get("type") == WIDGET_STATE for s in self.static.find_all("script"))

    @property
    def is_chapter(self) -> bool:
        return self.rel.startswith("notebooks/")

    @property
    def needs_browser(self) -> bool:
        return self.has_math or self.has_mermaid or self.has_widget_state


@pytest.fixture(scope="module")
def html_dir() -> Path:
    env = os.environ.get("LIGHTLM_HTML_DIR")
    path = Path(env).resolve() if env else ROOT / "_build" / "html"
    if not (path / "index.html").is_file():
        _unavailable(
            f"no built book at {path} (no index.html): build it with `bash scripts/book.sh` "
            "(or `jupyter-book build .`), or point LIGHTLM_HTML_DIR at a build's _build/html"
        )
    return path


@pytest.fixture(scope="module")
def pages(html_dir) -> dict[str, Page]:
    result = {}
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir).as_posix()
        if rel in NOT_CONTENT or rel.split("/")[0].startswith(("_", ".")):
            continue  # Sphinx's own pages, _static/, and stale copies of hidden folders
        tree = parse_html(path.read_text(encoding="utf-8"))
        if any(m.attrs.get("http-equiv", "").lower() == "refresh" for m in tree.find_all("meta")):
            continue  # the root index.html only redirects to the first page
        result[rel] = Page(rel, tree)
    assert result, f"{html_dir} holds no content pages"
    return result


@pytest.fixture(scope="module")
def chapters(pages) -> list[Page]:
    return [p for p in pages.values() if p.is_chapter]


@pytest.fixture(scope="module")
def chromium() -> str:
    candidates = [os.environ.get("LIGHTLM_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                  shutil.which("chromium-browser")]
    for exe in candidates:
        if exe and os.access(exe, os.X_OK):
            return exe
    _unavailable("headless Chromium not found: `apt-get install -y chromium` (Debian), "
                 "or set LIGHTLM_CHROMIUM to a Chromium binary")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]  # set per server: (path, status) of every request
    # Browsers run an ES module (mermaid's .mjs) only when served as JavaScript; not every Python knows .mjs.
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript", ".woff2": "font/woff2"}

    def log_request(self, code="-", size="-"):
        try:
            self.log.append((self.path, int(code)))
        except (TypeError, ValueError):
            self.log.append((self.path, 0))

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def server(html_dir):
    handler = type("Handler", (_QuietHandler,), {"log": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(html_dir)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", handler.log
    finally:
        httpd.shutdown()
        httpd.server_close()


def _render(chromium: str, url: str) -> tuple[str, list[str], str]:
    """Load url in a fresh headless Chromium; return (DOM after scripts ran, console lines, error)."""
    with tempfile.TemporaryDirectory(prefix="lightlm-chromium-") as profile:
        cmd = [
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return "", [], f"Chromium did not finish within {PAGE_TIMEOUT_S} s"
    console = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    if proc.returncode != 0 or "<html" not in proc.stdout:
        tail = "\n".join(proc.stderr.splitlines()[-5:])
        return "", console, f"Chromium exited {proc.returncode} with no DOM: {tail}"
    return proc.stdout, console, ""


@pytest.fixture(scope="module")
def rendered(pages, chromium, server) -> dict[str, Page]:
    """Every page that has math, mermaid or widget state, rendered; a few Chromiums at a time."""
    base, _ = server
    todo = [p for p in pages.values() if p.needs_browser]

    def work(page: Page):
        dom, page.console, page.error = _render(chromium, urljoin(base, page.rel))
        page.rendered = parse_html(dom) if dom else None

    workers = max(2, min(4, os.cpu_count() or 2))  # CPU-bound: more than the cores does not help
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, todo))
    return {p.rel: p for p in todo}


def _why(page: Page) -> str:
    """The render error or the page's own console errors, for a failure message."""
    if page.error:
        return f"    {page.error}"
    errors = [c for c in page.console if re.search(r"error|uncaught|failed", c, re.I)]
    return "\n".join(f"    console: {c[:300]}" for c in errors[:5])


def _report(failures: list[str]) -> str:
    return "\n".join(failures)


# --------------------------------------------------------------------------------------------------------
# The book has what these tests look at.

def test_the_book_has_chapter_pages(chapters):
    assert chapters, "no chapter pages (notebooks/*.html) in the build: are the notebooks in _toc.yml?"


def test_the_book_has_at_least_one_mermaid_diagram(pages):
    assert any(p.has_mermaid for p in pages.values()), "no page of the book has a mermaid diagram"


# --------------------------------------------------------------------------------------------------------
# Math.

def test_math_is_typeset_on_every_page_that_has_math(rendered):
    failures = []
    for page in rendered.values():
        if not page.has_math:
            continue
        if page.rendered is None:
            failures.append(f"{page.rel}: not rendered\n{_why(page)}")
            continue
        maths = page.rendered.find_all(cls="math")
        untypeset = [m for m in maths if not m.find_all("mjx-container")]
        if not maths or untypeset:
            sample = untypeset[0].visible_text().strip()[:80] if untypeset else ""
            failures.append(f"{page.rel}: {len(untypeset)} of {len(maths)} math elements not typeset "
                            f"by MathJax (first: {sample!r})\n{_why(page)}")
    assert not failures, _report(failures)


def test_no_math_has_a_tex_error(rendered):
    failures = []
    for page in rendered.values():
        if page.rendered is not None:
            errors = page.rendered.find_all("mjx-merror")
            if errors:
                failures.append(f"{page.rel}: {len(errors)} TeX error(s), first: "
                                f"{errors[0].attrs.get('data-mjx-error', '')!r}")
    assert not failures, _report(failures)


def test_no_raw_tex_is_left_in_the_visible_text_of_any_page(pages, rendered):
    failures = []
    for page in pages.values():
        # A page with no math, diagram or widget loads no script that could change its text.
        tree = page.rendered if page.needs_browser else page.static
        if tree is None:
            failures.append(f"{page.rel}: not rendered\n{_why(page)}")
            continue
        text = tree.visible_text()
        found = [d for d in RAW_TEX if d in text]
        if found:
            at = text.find(found[0])
            failures.append(f"{page.rel}: raw {found} in the text, e.g. {text[max(0, at - 40):at + 60]!r}")
    assert not failures, _report(failures)


_RAW_TABLE_RULE = re.compile(r"\|\s*:?-{3,}:?\s*\|")  # the |---|---| line of a Markdown table


def test_no_markdown_table_is_left_as_raw_text_on_any_page(pages):
    # e.g. a cell's Markdown output (lightlm.plot.table) parsed as CommonMark, which has no tables
    bad = [p.rel for p in pages.values() if _RAW_TABLE_RULE.search(p.static.visible_text())]
    assert not bad, f"raw Markdown tables ('|---|') in the text of: {bad} (nb_render_markdown_format: myst?)"


# --------------------------------------------------------------------------------------------------------
# Mermaid.

def test_every_mermaid_diagram_is_rendered_to_svg(rendered):
    failures = []
    for page in rendered.values():
        if not page.has_mermaid:
            continue
        if page.rendered is None:
            failures.append(f"{page.rel}: not rendered\n{_why(page)}")
            continue
        blocks = page.rendered.find_all(cls="mermaid")
        bare = [b for b in blocks if not b.find_all("svg")]
        if not blocks or bare:
            failures.append(f"{page.rel}: {len(bare)} of {len(blocks)} mermaid blocks have no <svg>\n{_why(page)}")
    assert not failures, _report(failures)


def test_no_mermaid_diagram_renders_as_a_syntax_error(rendered):
    failures = []
    for page in rendered.values():
        if page.rendered is None:
            continue
        for block in page.rendered.find_all(cls="mermaid"):
            if any(s.attrs.get("aria-roledescription") == "error" for s in block.find_all("svg")):
                source = block.attrs.get("data-original-code", "").strip()[:60]
                failures.append(f"{page.rel}: mermaid shows its error diagram for {source!r}")
    assert not failures, _report(failures)


# --------------------------------------------------------------------------------------------------------
# Widgets.

def test_widgets_render_on_every_page_that_embeds_widget_state(rendered):
    failures = []
    for page in rendered.values():
        if not page.has_widget_state:
            continue
        if page.rendered is None:
            failures.append(f"{page.rel}: not rendered\n{_why(page)}")
            continue
        views = [s for s in page.rendered.find_all("script") if s.attrs.get("type") == WIDGET_VIEW]
        missing = [v for v in views if v.parent is None or not v.parent.find_all(cls="jupyter-widgets")]
        if not views or missing:
            failures.append(f"{page.rel}: {len(missing)} of {len(views)} widget views not rendered "
                            f"(no .jupyter-widgets element beside them)\n{_why(page)}")
    assert not failures, _report(failures)


# --------------------------------------------------------------------------------------------------------
# Figures and links of the chapter pages.

def _local_target(html_dir: Path, page_rel: str, url: str) -> Path | None:
    """The file a relative URL on page_rel points at, or None for a URL that leaves the site."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page_rel), unquote(parts.path)))
    return html_dir / path


def test_every_chapter_page_has_a_figure(chapters):
    failures = []
    for page in chapters:
        article = (page.static.find_all("article") or page.static.find_all("main") or [page.static])[0]
        if not article.find_all("img"):
            failures.append(f"{page.rel}: no <img> in the chapter's text")
    assert chapters and not failures, _report(failures) or "no chapter pages"


def test_every_image_on_a_chapter_page_is_a_file_in_the_build(chapters, html_dir):
    failures = []
    for page in chapters:
        for img in page.static.find_all("img"):
            src = img.attrs.get("src", "")
            if src.startswith("data:image/"):
                continue
            target = _local_target(html_dir, page.rel, src)
            if target is None or not target.is_file():
                failures.append(f"{page.rel}: <img src={src!r}> is not a file in the build")
    assert not failures, _report(failures)


def _colab_links(page: Page) -> list[str]:
    return [a.attrs["href"] for a in page.static.find_all("a") if a.attrs.get("href", "").startswith(COLAB_PREFIX)]


def test_every_chapter_page_links_to_colab(chapters):
    missing = [p.rel for p in chapters if not _colab_links(p)]
    assert chapters and not missing, f"no link starting with {COLAB_PREFIX} on: {missing or 'no chapter pages'}"


def test_no_colab_link_has_a_dot_segment(chapters):
    bad = [f"{p.rel}: {href}" for p in chapters for href in _colab_links(p) if "/./" in href]
    assert not bad, "Colab links with '/./' (leave repository.path_to_book unset):\n" + _report(bad)


def test_each_chapters_colab_link_opens_its_own_notebook(chapters):
    bad = []
    for page in chapters:
        own = page.rel[: -len(".html")] + ".ipynb"
        bad += [f"{page.rel}: {href}" for href in _colab_links(page) if not href.endswith("/" + own)]
    assert not bad, "Colab links that do not end with the page's own notebook:\n" + _report(bad)


# --------------------------------------------------------------------------------------------------------
# Nothing comes from elsewhere, nothing is missing.

_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)
_REMOTE_IMPORT = re.compile(r"""(?:\bfrom\s*|\bimport\s*\(\s*)["']((?:https?:)?//[^"']*)""")


def test_no_page_loads_a_script_or_stylesheet_from_another_host(pages):
    failures = []
    for page in pages.values():
        for node in page.static.iter():
            if node.tag == "script":
                url = node.attrs.get("src", "")
                imported = _REMOTE_IMPORT.search("".join(c for c in node.children if isinstance(c, str)))
                if _REMOTE.match(url) or imported:
                    failures.append(f"{page.rel}: <script> loads {url if _REMOTE.match(url) else imported.group(1)}")
            elif node.tag == "link" and "stylesheet" in node.attrs.get("rel", "").split():
                if _REMOTE.match(node.attrs.get("href", "")):
                    failures.append(f"{page.rel}: stylesheet {node.attrs['href']}")
    assert not failures, _report(failures)


def test_rendering_requests_no_missing_file(rendered, server):
    _, log = server
    missing = sorted({path for path, status in log if status >= 400 and urlsplit(path).path != "/favicon.ico"})
    assert rendered and not missing, (
        "requests that failed while rendering:\n" + _report(missing) if missing else "nothing was rendered"
    )


# --------------------------------------------------------------------------------------------------------
# Chinese terms. A machine without a CJK font draws each Chinese character as an empty box (the .notdef glyph of
# whatever font the fallback chose); the DOM cannot show that, the DevTools protocol can: CSS.getPlatformFontsForNode
# names the platform fonts that drew a node's text, with how many glyphs each drew.

CJK_CHARS = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"  # punctuation, ideographs
_CJK = re.compile(f"[{CJK_CHARS}]+")

# Wraps every run of CJK characters in visible text in its own <span data-cjk-probe> (an inline span inherits its
# parent's font, so the run is drawn as before) and returns the runs, in the order of the spans.
_PROBE_JS = """(() => {
  const run = new RegExp("([" + %s + "]+)");
  const skip = new Set(["SCRIPT", "STYLE", "NOSCRIPT", "TEMPLATE", "TEXTAREA"]);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const found = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (run.test(node.data) && parent && !skip.has(parent.tagName) && parent.getClientRects().length) {
      found.push(node);
    }
  }
  const runs = [];
  for (const node of found) {
    const fragment = document.createDocumentFragment();
    node.data.split(run).forEach((part, i) => {
      if (i %% 2) {
        const span = document.createElement("span");
        span.dataset.cjkProbe = String(runs.length);
        span.textContent = part;
        runs.push(part);
        fragment.append(span);
      } else if (part) {
        fragment.append(part);
      }
    });
    node.replaceWith(fragment);
  }
  return runs;
})()""" % json.dumps(CJK_CHARS)


# Resolves once the page's scripts have finished rewriting it: MathJax has typeset (it splits and replaces the text
# nodes around each formula, which would detach the probes), the DOM has not changed for QUIET ms (widgets,
# mermaid, the theme), and the fonts are loaded; after MAX ms it resolves anyway.
_SETTLED_JS = """(async () => {
  const QUIET = 500, MAX = 30000, start = performance.now();
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  let last = performance.now();
  const observer = new MutationObserver(() => { last = performance.now(); });
  observer.observe(document, {subtree: true, childList: true, characterData: true});
  while (performance.now() - last < QUIET && performance.now() - start < MAX) {
    await new Promise(resolve => setTimeout(resolve, 100));
  }
  observer.disconnect();
  await document.fonts.ready;
  return performance.now() - start;
})()"""


def _above(fd: int, low: int) -> int:
    """A copy of descriptor fd numbered low or above (the original is closed)."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return copy


class DevTools:
    """A headless Chromium driven through its DevTools protocol over ``--remote-debugging-pipe``: JSON messages,
    each ended by a NUL byte, written to the browser's file descriptor 3 and read from its descriptor 4."""

    def __init__(self, chromium: str, profile: str, timeout: float = PAGE_TIMEOUT_S):
        to_browser, self._to = os.pipe()
        self._from, from_browser = os.pipe()
        # bash puts the browser's two pipe ends on descriptors 3 and 4, where Chromium expects them; moved
        # to 10 or above first, so that neither is itself 3 or 4 and overwritten by the other's redirection.
        to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', chromium, *CHROMIUM_FLAGS,
               f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.timeout, self._buffer, self._last_id, self._events = timeout, b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept for wait_for)."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self._events.append(reply)

    def wait_for(self, event: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for index, message in enumerate(self._events):
                if message["method"] == event and message.get("sessionId") == session:
                    return self._events.pop(index)
            self._events.clear()
            message = self._message(deadline)
            if "method" in message:
                self._events.append(message)

    def open_page(self, url: str) -> str:
        """Open url in a new tab, wait until it has loaded and its fonts are ready; return the tab's session."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "DOM", "CSS"):
            self.call(f"{domain}.enable", session)
        navigation = self.call("Page.navigate", session, url=url)
        if navigation.get("errorText"):
            raise RuntimeError(f"{url}: {navigation['errorText']}")
        self.wait_for("Page.loadEventFired", session)
        self.call("Runtime.evaluate", session, expression=_SETTLED_JS, awaitPromise=True)
        return session

    def close_page(self, session: str):
        target = self.call("Target.getTargetInfo", session)["targetInfo"]["targetId"]
        self.call("Target.closeTarget", targetId=target)

    def close(self):
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to)
            os.close(self._from)


@dataclass
class CjkRun:
    text: str  # a run of CJK characters as it stands in the page
    fonts: dict[str, int]  # platform font family -> glyphs it drew


def cjk_runs_and_their_fonts(devtools: DevTools, url: str) -> list[CjkRun]:
    """Every run of CJK characters in the visible text of url, with the platform fonts Chromium drew it with."""
    session = devtools.open_page(url)
    runs = devtools.call("Runtime.evaluate", session, expression=_PROBE_JS, returnByValue=True)["result"]["value"]
    root = devtools.call("DOM.getDocument", session, depth=0)["root"]["nodeId"]
    nodes = devtools.call("DOM.querySelectorAll", session, nodeId=root, selector="[data-cjk-probe]")["nodeIds"]
    assert len(nodes) == len(runs), f"{url}: {len(runs)} CJK runs wrapped but {len(nodes)} found again"
    result = []
    for text, node in zip(runs, nodes):
        fonts = devtools.call("CSS.getPlatformFontsForNode", session, nodeId=node)["fonts"]
        result.append(CjkRun(text, {f["familyName"]: f["glyphCount"] for f in fonts}))
    devtools.close_page(session)
    return result


@pytest.fixture(scope="module")
def chinese_fonts() -> set[str]:
    """The font families fontconfig says can draw Chinese (each of a font's names)."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        _unavailable("fontconfig's fc-list not found (Debian: `apt-get install -y fontconfig`)")
    listed = subprocess.run([fc_list, ":lang=zh", "family"], capture_output=True, text=True, check=True).stdout
    families = {name.strip() for line in listed.splitlines() for name in line.split(",") if name.strip()}
    if not families:
        _unavailable("no font that can draw Chinese is installed (`fc-list :lang=zh` lists none), so every "
                     "Chinese term would show as empty boxes: `apt-get install -y fonts-noto-cjk` (Debian)")
    return families


@pytest.fixture(scope="module")
def cjk_pages(pages, chromium, server, chinese_fonts) -> dict[str, list[CjkRun]]:
    """Every page whose text has CJK characters: the runs of them a reader sees, with the fonts that drew them."""
    base, _ = server
    todo = [p.rel for p in pages.values() if _CJK.search(p.static.visible_text())]
    result = {}
    with tempfile.TemporaryDirectory(prefix="lightlm-chromium-") as profile:
        devtools = DevTools(chromium, profile)
        try:
            for rel in todo:
                result[rel] = cjk_runs_and_their_fonts(devtools, urljoin(base, rel))
        finally:
            devtools.close()
    return result


def test_the_book_has_chinese_terms(cjk_pages):
    assert cjk_pages, "no page of the book has CJK characters in its text (the prose gives Chinese terms)"


def test_every_chinese_term_is_drawn_with_a_font_that_has_its_glyphs(cjk_pages, chinese_fonts):
    failures = []
    for rel, runs in cjk_pages.items():
        if not runs:
            failures.append(f"{rel}: its HTML has CJK text but none was found drawn on the rendered page")
        for run in runs:
            # Every glyph is drawn, and by a font that has Chinese glyphs: a font without them draws .notdef boxes.
            wrong = {family: n for family, n in run.fonts.items() if family not in chinese_fonts}
            if not run.fonts or wrong or sum(run.fonts.values()) < len(run.text):
                failures.append(f"{rel}: {run.text!r} drawn with {run.fonts or 'no font'}; fonts that can draw "
                                f"Chinese here: {sorted(chinese_fonts)[:4]}")
    assert not failures, _report(failures[:20]) + (f"\n... and {len(failures) - 20} more" if len(failures) > 20 else "")
