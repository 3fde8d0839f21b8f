"""The browser tool against a local HTTP server (127.0.0.1 only) and a fake SearXNG / Brave JSON
endpoint: search results, pages as numbered lines with cursors, following links, scrolling,
find, citations, and every failure as an error the model reads (never an exception out of the
session)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from gptoss_mlx import GptOssError, harmony
from gptoss_mlx.tool_loop import ToolLoop
from gptoss_mlx.tools import BraveSearch, Browser, ToolCall, ToolError

INDEX = """<!doctype html><html><head><title>Gpt-oss  tools</title>
<style>body {color: red}</style><script>document.write("hidden")</script></head>
<body><h1>Tools</h1>
<p>Read <a href="/long.html">the long page</a> or <a href="http://example.org/spec">the spec</a>,
and <a href="#top">back to top</a>.</p>
<img src="cat.png" alt="A cat"><ul><li>first item</li><li>second item</li></ul>
<p>Literal 【brackets】 stay apart from link markers.</p></body></html>"""
LONG_LINES = [f"Paragraph {i:03d} says nothing much." for i in range(300)]
LONG_LINES[217] = "Paragraph 217 hides the Needle we look for."


class Site(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def send(self, status, body, content_type=None, headers=()):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        base = f"http://127.0.0.1:{self.server.server_port}"
        if url.path == "/index.html":
            self.send(200, INDEX.encode(), "text/html; charset=utf-8")
        elif url.path == "/long.html":
            body = "".join(f"<p>{line}</p>" for line in LONG_LINES)
            self.send(
                200, f"<html><title>Long</title><body>{body}</body></html>".encode(), "text/html"
            )
        elif url.path == "/notes.txt":
            self.send(200, b"plain text, line one\nline two", "text/plain")
        elif url.path == "/moved":
            self.send(302, b"", headers=[("Location", "/index.html")])
        elif url.path in ("/loop-a", "/loop-b"):
            other = "/loop-b" if url.path == "/loop-a" else "/loop-a"
            self.send(302, b"", headers=[("Location", other)])
        elif url.path == "/file.bin":
            self.send(200, bytes(range(256)) * 8, "application/octet-stream")
        elif url.path == "/untyped":
            self.send(200, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
        elif url.path == "/huge.html":
            self.send(200, b"<p>" + b"x" * 300_000 + b"</p>", "text/html")
        elif url.path == "/slow":
            time.sleep(3)
            self.send(200, b"<p>finally</p>", "text/html")
        elif url.path == "/search":  # SearXNG's JSON API
            query = parse_qs(url.query)
            assert query["format"] == ["json"]
            q = query["q"][0]
            results = [
                {"url": f"{base}/index.html", "title": "Tools index", "content": f"About {q}."},
                {"url": f"{base}/long.html", "title": "A long page", "content": "Many lines."},
                {"url": "http://example.org/spec", "title": "Spec", "content": "Elsewhere."},
            ]
            self.send(
                200, json.dumps({"query": q, "results": results}).encode(), "application/json"
            )
        elif url.path == "/brave":  # Brave Search API
            if self.headers.get("X-Subscription-Token") != "secret-key":
                self.send(401, b'{"error": "bad key"}', "application/json")
                return
            results = [{"url": f"{base}/notes.txt", "title": "Notes", "description": "Plain."}]
            self.send(200, json.dumps({"web": {"results": results}}).encode(), "application/json")
        else:
            self.send(404, b"<h1>Not found</h1>", "text/html")


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def browser(site):
    return Browser(search_url=site, allow_private_network=True, timeout=1.5)


def call(browser, function, **args):
    return browser.run(ToolCall("call_0", f"browser.{function}", json.dumps(args), "analysis"))


def test_search_results_are_a_page_of_links(browser, site):
    shown = call(browser, "search", query="harmony tools", topn=2)
    lines = shown.splitlines()
    assert lines[0] == "[0] Search results for `harmony tools`"
    assert lines[1] == "**viewing lines [0 - 5] of 5**"
    assert lines[3] == "L0: * 【0†Tools index†127.0.0.1:" + site.rsplit(":", 1)[1] + "】"
    assert lines[4] == "L1: About harmony tools."
    assert "Spec" not in shown  # topn honoured
    # Opening result 1 fetches it: a new cursor.
    opened = call(browser, "open", id=1)
    assert opened.startswith(f"[1] Long ({site}/long.html)\n")


def test_a_page_as_numbered_lines_with_links(browser, site):
    shown = call(browser, "open", id=f"{site}/index.html")
    assert shown.splitlines() == [
        f"[0] Gpt-oss tools ({site}/index.html)",
        "**viewing lines [0 - 10] of 10**",
        "",
        "L0: # Tools",
        "L1: ",
        "L2: Read 【0†the long page】 or 【1†the spec†example.org】,",
        "L3: and back to top.",
        "L4: ",
        "L5: [Image: A cat]",
        "L6: ",
        "L7: * first item",
        "L8: * second item",
        "L9: ",
        "L10: Literal 〖brackets〗 stay apart from link markers.",
    ]
    # Scripts and styles are dropped; page text never looks like a link marker (〖〗).
    # Link 0 is the long page; a redirect is followed to its target.
    assert call(browser, "open", id=0).startswith(f"[1] Long ({site}/long.html)")
    assert call(browser, "open", id=f"{site}/moved").startswith(
        f"[2] Gpt-oss tools ({site}/index.html)"
    )
    text = call(browser, "open", id=f"{site}/notes.txt")
    assert text.endswith("L0: plain text, line one\nL1: line two")


def test_long_pages_scroll_by_cursor(browser, site):
    first = call(browser, "open", id=f"{site}/long.html")
    assert "**viewing lines [0 - " in first and "of 598**" in first  # 300 paragraphs + blanks
    shown = [int(line.split(":")[0][1:]) for line in first.split("\n\n", 1)[1].splitlines()]
    assert shown[0] == 0 and 20 < len(shown) < 300  # one view, not the whole page
    page = call(browser, "open", cursor=0, loc=434, num_lines=3)
    assert page.splitlines()[:2] == [
        f"[1] Long ({site}/long.html)",
        "**viewing lines [434 - 436] of 598**",
    ]
    assert page.endswith(
        "L434: Paragraph 217 hides the Needle we look for.\n"
        "L435: \n"
        "L436: Paragraph 218 says nothing much."
    )
    with pytest.raises(ToolError, match="past the end"):
        call(browser, "open", cursor=0, loc=5000)
    with pytest.raises(ToolError, match="cursor 9 does not exist"):
        call(browser, "open", cursor=9, loc=0)


def test_find_and_citations(browser, site):
    call(browser, "open", id=f"{site}/long.html")
    found = call(browser, "find", pattern="needle")
    assert (
        found.splitlines()[0] == f"[1] Find results for text: `needle` in `Long` ({site}/long.html)"
    )
    assert "L0: # 【0†match at L434】" in found
    assert "L1: Paragraph 217 hides the Needle we look for." in found
    # Opening a match shows the page around it.
    around = call(browser, "open", id=0)
    assert "**viewing lines [430 - " in around and "L434: Paragraph 217 hides" in around
    assert "No `find` results" in call(browser, "find", pattern="zebra", cursor=0)
    with pytest.raises(ToolError, match="not on search or find results"):
        call(browser, "find", pattern="x", cursor=1)
    # Citations the model writes point back at the views' pages and lines.
    cites = browser.citations("It is hidden 【2†L434】 and 【0†L0-L2】, not 【99†L1】.")
    assert [(c.cursor, c.start, c.end, c.url) for c in cites] == [
        (2, 434, 434, f"{site}/long.html"),
        (0, 0, 2, f"{site}/long.html"),
    ]
    assert cites[0].text == "Paragraph 217 hides the Needle we look for."


@pytest.mark.parametrize(
    "path, message",
    [
        ("/missing", "answered HTTP 404 Not Found"),
        ("/loop-a", "too many redirects (more than 5)"),
        ("/file.bin", "not a text page (content type application/octet-stream)"),
        ("/untyped", "not a text page (binary content)"),
        ("/huge.html", "is too large"),
        ("/slow", "did not answer within 1.5 s"),
    ],
)
def test_fetch_failures_are_tool_errors(browser, site, path, message):
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Browser(allow_private_network=True, timeout=1.5, max_page_bytes=100_000).open(
            id=site + path
        )
    assert browser.stack == []  # a failed open pushes no view


def test_urls_and_hosts_that_are_refused(site, monkeypatch):
    browser = Browser(timeout=1.5)  # the default: public addresses only
    with pytest.raises(ToolError, match="local or private network address"):
        browser.open(id=f"{site}/index.html")
    for url in ["file:///etc/passwd", "ftp://example.org/x", "javascript:alert(1)"]:
        with pytest.raises(ToolError, match="only http and https"):
            browser.open(id=url)

    def no_dns(host, *args, **kwargs):  # a name that does not resolve (no real DNS query)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ToolError, match="cannot resolve the host 'no-such-host.example'"):
        browser.open(id="http://no-such-host.example/")
    permissive = Browser(timeout=1.5, allow_private_network=True)  # httpx's own lookup fails
    with pytest.raises(ToolError, match="cannot fetch http://no-such-host.example/: ConnectError"):
        permissive.open(id="http://no-such-host.example/")


def test_connection_refused_is_a_tool_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ToolError, match="ConnectError"):
        Browser(allow_private_network=True).open(id=f"http://127.0.0.1:{port}/")


def test_bad_calls_are_tool_errors(browser, site):
    with pytest.raises(ToolError, match="no page is open yet"):
        call(browser, "find", pattern="x")
    call(browser, "open", id=f"{site}/index.html")
    with pytest.raises(ToolError, match="there is no link 7"):
        call(browser, "open", id=7)
    with pytest.raises(ToolError, match="no function 'click'"):
        call(browser, "click", id=1)
    with pytest.raises(ToolError, match="bad arguments for browser.open"):
        call(browser, "open", link=1)
    with pytest.raises(ToolError, match="not valid JSON"):
        browser.run(ToolCall("c", "browser.open", "{id: 1", "analysis"))


def test_in_a_loop_errors_reach_the_model(site, tok):
    """Through the tool loop a failure is an error result, never an exception."""
    loop = ToolLoop(builtin_tools=[Browser(allow_private_network=True)], tokenizer=tok)
    output, error = loop.execute(ToolCall("c", "browser.open", json.dumps({"id": site + "/x"})))
    assert error and output.startswith("Error: ") and "HTTP 404" in output


def test_search_backends(site):
    brave = BraveSearch(api_key="secret-key", url=f"{site}/brave")
    browser = Browser(search=brave, allow_private_network=True)
    assert "【0†Notes†127.0.0.1:" in browser.search("notes")
    with pytest.raises(ToolError, match="HTTP 401"):
        Browser(search=BraveSearch(api_key="wrong", url=f"{site}/brave")).search("notes")
    with pytest.raises(ToolError, match="the search \\(SearXNG\\) failed: HTTP 404"):
        Browser(search_url=f"{site}/nothing-here").search("x")
    with pytest.raises(GptOssError, match="API key"):
        BraveSearch(api_key="")
    with pytest.raises(GptOssError, match="http"):
        Browser(search_url="localhost:8888")


def test_declarations_match_openai_harmony(tok, harmony_enc, site):
    """With a search backend the namespace is openai-harmony's own browser; without one,
    `search` is left out (its description and the rest unchanged)."""
    oh = pytest.importorskip("openai_harmony")

    def oracle(config):
        system = oh.SystemContent.new().with_tools(config)
        messages = [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
            oh.Message.from_role_and_content(oh.Role.USER, "hi"),
        ]
        return harmony_enc.render_conversation_for_completion(
            oh.Conversation.from_messages(messages), oh.Role.ASSISTANT
        )

    def ours(browser):
        return harmony.render_prompt(
            [{"role": "user", "content": "hi"}],
            tokenizer=tok,
            builtin_tools=[browser.namespace()],
        )

    full = oh.ToolNamespaceConfig.browser()
    assert ours(Browser(search_url=site)) == oracle(full)
    no_search = oh.ToolNamespaceConfig(
        name="browser",
        description=full.description,
        tools=[t for t in full.tools if t.name != "search"],
    )
    assert ours(Browser()) == oracle(no_search)
    assert "type search" not in tok.decode(ours(Browser()))
    with pytest.raises(ToolError, match="no search backend"):
        Browser().run(ToolCall("c", "browser.search", '{"query": "x"}'))


def test_fresh_shares_the_settings_not_the_pages(browser, site):
    call(browser, "search", query="x")
    copy = browser.fresh()
    assert copy.backend is browser.backend and copy.stack == [] and len(browser.stack) == 1
    assert (copy.timeout, copy.allow_private_network) == (1.5, True)
    assert copy.namespace() == browser.namespace()
    with pytest.raises(ToolError, match="no page is open"):
        call(copy, "find", pattern="x")
