"""The ``browser`` built-in tool: ``search``, ``open`` and ``find`` over pages shown as numbered
lines, the model's way of reading the web (the page/cursor model of OpenAI's gpt-oss reference).

* A page is text in lines of at most ``line_width`` characters. Links become ``【id†text】``
  (``【id†text†domain】`` for another site), images ``[Image: alt]``; ``open(id=N)`` follows link
  ``N``. The HTML is converted with markdownify (MIT) over BeautifulSoup (MIT), so headings,
  lists and tables keep their structure and every link can be rewritten into a marker while
  converting; the whole page is kept (no boilerplate guessing: ``find`` reaches everything).
* Every view (a search, an opened page, a scroll, a find) is pushed on a stack; its index is its
  **cursor**, shown as ``[cursor]`` before the view. The model scrolls a view with
  ``open(cursor=c, loc=line)`` and cites lines as ``【cursor†Lstart-Lend】`` (:meth:`Browser.
  citations` resolves them to page, URL and text).
* ``open`` fetches with httpx: http and https only, ``timeout`` seconds for the whole fetch, at
  most ``max_redirects`` redirects, at most ``max_page_bytes`` of body, HTML and text only, and
  (unless ``allow_private_network``) never an address on this machine or a private network.
* ``search`` asks a :class:`SearchBackend`: a SearXNG instance (:class:`SearxngSearch`, no key) or
  the Brave Search API (:class:`BraveSearch`, a key). Without one, the tool declares only
  ``open`` and ``find``.

Every failure (DNS, refused connection, timeout, HTTP error, binary content, an oversized page,
a bad cursor or link id) is a :class:`ToolError`: the model reads what went wrong.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import textwrap
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlparse

from ..errors import GptOssError
from ..harmony import ToolNamespace
from .base import BuiltinTool, ToolCall, ToolError

try:  # the [browser] extra
    import httpx
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter
except ImportError:  # pragma: no cover - exercised only without the extra
    httpx = None

__all__ = ["BraveSearch", "Browser", "Citation", "Page", "SearchBackend", "SearchResult"]
__all__ += ["SearxngSearch", "html_to_page"]

# The declaration, as gpt-oss was trained on it (openai-harmony's browser namespace).
DESCRIPTION = (
    "Tool for browsing.\n"
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\n"
    "sources=web (default: web)"
)
SEARCH = {
    "name": "search",
    "description": "Searches for information related to `query` and displays `topn` results.",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "topn": {"type": "number", "default": 10},
            "source": {"type": "string"},
        },
        "required": ["query"],
    },
}
OPEN = {
    "name": "open",
    "description": (
        "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
        "showing `num_lines` lines.\n"
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
        "If `cursor` is not provided, the most recent page is implied.\n"
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
        "If `loc` is not provided, the viewport will be positioned at the beginning of the "
        "document or centered on the most relevant passage, if available.\n"
        "Use this function without `id` to scroll to a new location of an opened page."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "id": {"type": ["number", "string"], "default": -1},
            "cursor": {"type": "number", "default": -1},
            "loc": {"type": "number", "default": -1},
            "num_lines": {"type": "number", "default": -1},
            "view_source": {"type": "boolean", "default": False},
            "source": {"type": "string"},
        },
    },
}
FIND = {
    "name": "find",
    "description": (
        "Finds exact matches of `pattern` in the current page, or the page given by `cursor`."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "pattern": {"type": "string"},
            "cursor": {"type": "number", "default": -1},
        },
        "required": ["pattern"],
    },
}

CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")
_LINK = re.compile(r"【\d+†([^†】]*)(?:†[^†】]*)?】")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "+json", "+xml")
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "iframe", "head", "title", "form")


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""


class SearchBackend(ABC):
    """Where ``search`` goes: ``search(query, count, timeout)`` -> results, best first."""

    @abstractmethod
    def search(self, query: str, count: int, timeout: float) -> list[SearchResult]:
        """Raise :class:`ToolError` when the search fails."""


def _get_json(url: str, timeout: float, what: str, **kwargs) -> object:
    try:
        response = httpx.get(url, timeout=timeout, **kwargs)
    except httpx.HTTPError as e:
        raise ToolError(f"{what} failed: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise ToolError(f"{what} failed: HTTP {response.status_code} {response.reason_phrase}")
    try:
        return response.json()
    except json.JSONDecodeError:
        raise ToolError(f"{what} failed: the answer is not JSON") from None


class SearxngSearch(SearchBackend):
    """A SearXNG instance's JSON API (``GET {url}/search?q=...&format=json``; no key). The
    instance must allow the json format (``search: formats: [html, json]`` in its settings)."""

    def __init__(self, url: str) -> None:
        if urlparse(url).scheme not in ("http", "https"):
            raise GptOssError(f"the SearXNG URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")

    def search(self, query: str, count: int, timeout: float) -> list[SearchResult]:
        data = _get_json(
            f"{self.url}/search",
            timeout,
            "the search (SearXNG)",
            params={"q": query, "format": "json"},
        )
        results = data.get("results", []) if isinstance(data, dict) else []
        return [
            SearchResult(str(r.get("title") or r["url"]), r["url"], str(r.get("content") or ""))
            for r in results[:count]
            if isinstance(r, dict) and r.get("url")
        ]


class BraveSearch(SearchBackend):
    """The Brave Search API (``api_key``, or ``$BRAVE_API_KEY``)."""

    URL = "https://api.search.brave.com/res/v1/web/search"

    def __init__(self, api_key: str | None = None, *, url: str = URL) -> None:
        self.api_key = api_key or os.environ.get("BRAVE_API_KEY")
        if not self.api_key:
            raise GptOssError("Brave Search needs an API key: api_key= or $BRAVE_API_KEY")
        self.url = url

    def search(self, query: str, count: int, timeout: float) -> list[SearchResult]:
        data = _get_json(
            self.url,
            timeout,
            "the search (Brave)",
            params={"q": query, "count": min(count, 20)},
            headers={"Accept": "application/json", "X-Subscription-Token": self.api_key},
        )
        web = data.get("web", {}) if isinstance(data, dict) else {}
        return [
            SearchResult(str(r.get("title") or r["url"]), r["url"], str(r.get("description") or ""))
            for r in web.get("results", [])[:count]
            if isinstance(r, dict) and r.get("url")
        ]


@dataclass
class Page:
    """A page as the model reads it: ``lines``, and ``links`` from link id to URL. Search and
    find results also map link ids to a line of a page (``targets``: opened there)."""

    url: str
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)
    targets: dict[int, tuple[Page, int]] = field(default_factory=dict)
    is_results: bool = False  # a search or find page (no `find` in it)


@dataclass
class Citation:
    """What ``【cursor†Lstart-Lend】`` points at."""

    cursor: int
    start: int
    end: int
    url: str
    title: str
    text: str


def _domain(url: str) -> str:
    return urlparse(url).netloc


def _clean(text: str) -> str:
    """Text with the characters of link markers swapped for look-alikes."""
    return text.replace("【", "〖").replace("】", "〗").replace("†", "‡")


class _PageConverter(MarkdownConverter if httpx is not None else object):
    """markdownify, with links as ``【id†text(†domain)】`` markers and images as their alt."""

    def __init__(self, url: str, links: dict[int, str]) -> None:
        super().__init__(
            heading_style="ATX",
            bullets="*",
            escape_asterisks=False,
            escape_underscores=False,
            escape_misc=False,
            autolinks=False,
        )
        self.url, self.links, self.ids = url, links, {u: i for i, u in links.items()}

    def convert_a(self, el, text, parent_tags):  # noqa: D102 (markdownify's hook)
        text = " ".join(text.split())
        href = (el.get("href") or "").strip()
        if not text or not href or href.startswith("#"):
            return text
        url = urljoin(self.url, href)
        if urlparse(url).scheme not in ("http", "https"):
            return text
        if url not in self.ids:
            self.ids[url] = len(self.links)
            self.links[self.ids[url]] = url
        text = text.replace("†", "‡")
        if _domain(url) == _domain(self.url):
            return f"【{self.ids[url]}†{text}】"
        return f"【{self.ids[url]}†{text}†{_domain(url)}】"

    def convert_img(self, el, text, parent_tags):  # noqa: D102
        alt = " ".join((el.get("alt") or el.get("title") or "").split())
        return f"[Image: {alt}]" if alt else ""


def html_to_page(html: bytes | str, url: str, encoding: str | None = None) -> tuple[str, str, dict]:
    """``(title, text, links)`` of an HTML document: markdown-like text with link markers."""
    soup = BeautifulSoup(
        html, "html.parser", from_encoding=encoding if isinstance(html, bytes) else None
    )
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for node in soup.find_all(string=True):
        if "【" in node or "】" in node or "†" in node:
            node.replace_with(_clean(str(node)))
    links: dict[int, str] = {}
    text = _PageConverter(url, links).convert_soup(soup)
    return _clean(title) or _domain(url), text, links


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters (longer lines wrapped at spaces), runs of blank
    lines collapsed to one, trailing space removed."""
    lines: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        if not line:
            if lines and lines[-1] != "":
                lines.append("")
            continue
        lines.extend(textwrap.wrap(line, width, break_on_hyphens=False) or [""])
    while lines and lines[-1] == "":
        lines.pop()
    return lines


class Browser(BuiltinTool):
    """harmony's ``browser`` tool: ``search`` (with a backend), ``open``, ``find``.

    ``search_url``: a SearXNG instance; or ``search``: any :class:`SearchBackend` (e.g.
    ``BraveSearch()``); with neither, ``search`` is not declared. ``timeout`` seconds per fetch,
    ``max_page_bytes``, ``max_redirects``, ``view_chars`` (how much one view shows when the model
    gives no ``num_lines``), ``line_width``; ``allow_private_network`` lets ``open`` reach this
    machine and private networks (off: a web page could otherwise make the model read local
    services).
    """

    name = "browser"

    def __init__(
        self,
        *,
        search_url: str | None = None,
        search: SearchBackend | None = None,
        timeout: float = 15.0,
        max_page_bytes: int = 5_000_000,
        max_redirects: int = 5,
        view_chars: int = 4000,
        line_width: int = 80,
        allow_private_network: bool = False,
        user_agent: str = "Mozilla/5.0 (compatible; gptoss-mlx browser)",
    ) -> None:
        if httpx is None:
            raise GptOssError(
                "the browser tool needs httpx, beautifulsoup4 and markdownify: "
                "pip install 'gptoss-mlx[browser]'"
            )
        if search_url is not None and search is not None:
            raise GptOssError("give search_url (SearXNG) or search (a backend), not both")
        self.backend = SearxngSearch(search_url) if search_url else search
        self.timeout = float(timeout)
        self.max_page_bytes = int(max_page_bytes)
        self.max_redirects = int(max_redirects)
        self.view_chars = int(view_chars)
        self.line_width = int(line_width)
        self.allow_private_network = allow_private_network
        self.user_agent = user_agent
        self.reset()

    def namespace(self) -> ToolNamespace:
        functions = ([SEARCH] if self.backend is not None else []) + [OPEN, FIND]
        return ToolNamespace("browser", DESCRIPTION, functions)

    def reset(self) -> None:
        self.stack: list[tuple[Page, int]] = []  # (page, first line shown) per cursor
        self.pages: dict[str, Page] = {}  # by URL, fetched pages only

    def fresh(self) -> Browser:
        """A browser with this one's settings and search backend (shared: it keeps no state),
        no pages open."""
        return Browser(
            search=self.backend,
            timeout=self.timeout,
            max_page_bytes=self.max_page_bytes,
            max_redirects=self.max_redirects,
            view_chars=self.view_chars,
            line_width=self.line_width,
            allow_private_network=self.allow_private_network,
            user_agent=self.user_agent,
        )

    # -- the functions ---------------------------------------------------------------------------

    def run(self, call: ToolCall) -> str:
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"the arguments are not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ToolError("the arguments must be a JSON object")
        args.pop("source", None)  # one source: the web
        functions = {"open": self.open, "find": self.find}
        if self.backend is not None:
            functions["search"] = self.search
        if call.function not in functions:
            raise ToolError(
                f"the browser has no function {call.function!r}; it has "
                + ", ".join(functions)
                + ("" if self.backend else " (no search backend is configured)")
            )
        try:
            return functions[call.function](**args)
        except TypeError as e:
            raise ToolError(f"bad arguments for browser.{call.function}: {e}") from None

    def search(self, query: str, topn: int = 10, top_n: int | None = None) -> str:
        """Search results as a page whose links are the results."""
        if self.backend is None:
            raise ToolError("no search backend is configured")
        count = int(top_n if top_n is not None else topn)
        results = self.backend.search(str(query), max(1, min(count, 50)), self.timeout)
        lines, links = [], {}
        for i, r in enumerate(results):
            links[i] = r.url
            lines.append(f"* 【{i}†{_clean(r.title)}†{_domain(r.url)}】")
            lines += _wrap(_clean(r.snippet), self.line_width)
            lines.append("")
        if not results:
            lines = [f"No results for `{_clean(str(query))}`."]
        page = Page("", f"Search results for `{_clean(str(query))}`", lines, links, is_results=True)
        return self._show(page, 0, -1)

    def open(
        self,
        id: int | str = -1,
        cursor: int = -1,
        loc: int = -1,
        num_lines: int = -1,
        view_source: bool = False,
    ) -> str:
        """Open a URL (``id`` a string), a link of a view (``id`` a number), or scroll a view."""
        if isinstance(id, str) and id.strip().lstrip("-").isdigit():
            id = int(id)
        start = -1
        if isinstance(id, str):
            page = self._fetch_page(id.strip(), view_source)
        else:
            current, _ = self._view(cursor)
            id = int(id)
            if id < 0:
                page = current
                if view_source:
                    page = self._fetch_page(current.url, True)
            elif id in current.targets:
                page, start = current.targets[id]
            elif id in current.links:
                page = self.pages.get(current.links[id]) if not view_source else None
                page = page or self._fetch_page(current.links[id], view_source)
            else:
                raise ToolError(
                    f"there is no link {id} on the page at cursor {self._cursor(cursor)}"
                )
        if loc < 0 and start >= 0:
            loc = max(0, start - 4)  # a little context above the passage
        return self._show(page, max(loc, 0), num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        """Lines of a view's page containing ``pattern`` (ignoring case), as a page of matches:
        ``open(id=N)`` goes to match ``N``."""
        page, _ = self._view(cursor)
        if page.is_results:
            raise ToolError("`find` works on an opened page, not on search or find results")
        needle = str(pattern).lower()
        if not needle:
            raise ToolError("the pattern is empty")
        plain = [_LINK.sub(r"\1", line) for line in page.lines]
        lines, targets, i = [], {}, 0
        while i < len(plain) and len(targets) < 50:
            if needle in plain[i].lower():
                n = len(targets)
                targets[n] = (page, i)
                lines.append(f"# 【{n}†match at L{i}】")
                lines += plain[i : i + 4] + [""]
                i += 4
            else:
                i += 1
        if not targets:
            lines = [f"No `find` results for pattern: `{_clean(str(pattern))}`"]
        title = f"Find results for text: `{_clean(str(pattern))}` in `{page.title}`"
        return self._show(Page(page.url, title, lines, {}, targets, is_results=True), 0, -1)

    # -- views and citations ---------------------------------------------------------------------

    def _cursor(self, cursor: int) -> int:
        return len(self.stack) - 1 if int(cursor) < 0 else int(cursor)

    def _view(self, cursor: int) -> tuple[Page, int]:
        if not self.stack:
            raise ToolError(
                "no page is open yet: open a URL" + (" or search" if self.backend else "")
            )
        c = self._cursor(cursor)
        if not 0 <= c < len(self.stack):
            raise ToolError(
                f"cursor {cursor} does not exist: cursors are 0 to {len(self.stack) - 1}"
            )
        return self.stack[c]

    def _show(self, page: Page, loc: int, num_lines: int) -> str:
        """Push a view of ``page`` from line ``loc``; its display."""
        total = len(page.lines)
        if total and loc >= total:
            raise ToolError(
                f"line {loc} is past the end of the page (its last line is {total - 1})"
            )
        if num_lines is not None and int(num_lines) > 0:
            end = min(total, loc + int(num_lines))
        else:
            end, size = loc, 0
            while end < total and (
                end == loc or size + len(page.lines[end]) + 8 <= self.view_chars
            ):
                size += len(page.lines[end]) + 8
                end += 1
        self.stack.append((page, loc))
        header = f"[{len(self.stack) - 1}] {page.title}" + (f" ({page.url})" if page.url else "")
        scrollbar = f"**viewing lines [{loc} - {max(end - 1, loc)}] of {max(total - 1, 0)}**"
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
        return f"{header}\n{scrollbar}\n\n{body}"

    def citations(self, text: str) -> list[Citation]:
        """The ``【cursor†Lstart-Lend】`` citations in ``text`` that point at a view: its page's
        URL and title and the cited lines (links shown as their text)."""
        out = []
        for match in CITATION.finditer(text):
            cursor, start = int(match.group(1)), int(match.group(2))
            end = int(match.group(3) or start)
            if cursor >= len(self.stack) or end < start:
                continue
            page = self.stack[cursor][0]
            lines = [_LINK.sub(r"\1", line) for line in page.lines[start : end + 1]]
            if lines:
                out.append(Citation(cursor, start, end, page.url, page.title, "\n".join(lines)))
        return out

    # -- fetching --------------------------------------------------------------------------------

    def _fetch_page(self, url: str, view_source: bool = False) -> Page:
        final, content_type, body, encoding = self.fetch(url)
        if view_source or not content_type.startswith(_HTML_TYPES):
            text = body.decode(encoding or "utf-8", errors="replace")
            title, links = (f"Source of {final}" if view_source else _domain(final)), {}
        else:
            title, text, links = html_to_page(body, final, encoding)
        page = Page(final, title, _wrap(text, self.line_width) or ["(empty page)"], links)
        if not view_source:
            self.pages[url] = self.pages[final] = page
        return page

    def _check_host(self, url: str) -> None:
        parts = urlparse(url)
        if parts.scheme not in ("http", "https"):
            raise ToolError(f"only http and https URLs can be opened, not {url!r}")
        if not parts.hostname:
            raise ToolError(f"{url!r} is not a full URL (http://host/...)")
        if self.allow_private_network:
            return
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise ToolError(f"cannot resolve the host {parts.hostname!r}: {e}") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global:
                raise ToolError(
                    f"{parts.hostname} is a local or private network address ({address}); the "
                    "browser opens only public web pages"
                )

    def fetch(self, url: str) -> tuple[str, str, bytes, str | None]:
        """``(final URL, content type, body, charset)`` of ``url``, following redirects."""
        deadline = time.monotonic() + self.timeout
        headers = {"User-Agent": self.user_agent, "Accept": "text/html,text/plain;q=0.9,*/*;q=0.5"}
        with httpx.Client(timeout=self.timeout, follow_redirects=False, headers=headers) as client:
            for _ in range(self.max_redirects + 1):
                self._check_host(url)
                try:
                    with client.stream("GET", url) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code >= 400:
                            raise ToolError(
                                f"{url} answered HTTP {response.status_code} "
                                f"{response.reason_phrase}"
                            )
                        content_type = self._content_type(response)
                        body = self._body(response, url, deadline)
                        if not content_type:
                            content_type = self._sniff(body, url)
                        return str(response.url), content_type, body, response.charset_encoding
                except httpx.TimeoutException:
                    raise ToolError(f"{url} did not answer within {self.timeout:g} s") from None
                except httpx.HTTPError as e:
                    raise ToolError(f"cannot fetch {url}: {type(e).__name__}: {e}") from None
        raise ToolError(f"too many redirects (more than {self.max_redirects}) from {url}")

    @staticmethod
    def _content_type(response) -> str:
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (
            ctype.startswith("text/") or ctype in _HTML_TYPES or ctype.endswith(_TEXT_TYPES)
        ):
            raise ToolError(
                f"{response.url} is not a text page (content type {ctype}); the browser reads "
                "HTML and text only"
            )
        return ctype

    def _body(self, response, url: str, deadline: float) -> bytes:
        size = response.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_page_bytes:
            raise ToolError(
                f"{url} is too large ({int(size)} bytes; the limit is {self.max_page_bytes})"
            )
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_page_bytes:
                raise ToolError(f"{url} is too large (more than {self.max_page_bytes} bytes)")
            if time.monotonic() > deadline:
                raise ToolError(f"{url} did not finish within {self.timeout:g} s")
        return bytes(body)

    @staticmethod
    def _sniff(body: bytes, url: str) -> str:
        """A content type for a body sent without one: binary is refused."""
        head = body[:2048]
        if b"\x00" in head:
            raise ToolError(
                f"{url} is not a text page (binary content); the browser reads HTML and text only"
            )
        return (
            "text/html" if re.search(rb"<(!doctype html|html|body)", head, re.I) else "text/plain"
        )
