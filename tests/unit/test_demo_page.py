"""The demo page's files and local server, and the CORS settings that let it reach TorchServe.
(The page itself runs in a real browser in tests/integration/test_demo.py.)"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import harness
import pytest
from helpers import ROOT

import demo.server as demo


@pytest.fixture(scope="module")
def site():
    server = demo.start("127.0.0.1", 0, "http://127.0.0.1:9080/", "http://127.0.0.1:9081")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    demo.stop(server)


def test_the_server_serves_the_page_its_settings_and_nothing_else(site):
    status, body, headers = harness.http("GET", f"{site}/")
    assert status == 200 and body == (ROOT / "demo" / "index.html").read_bytes()
    assert headers["Content-Type"].startswith("text/html")
    for path, content_type in (("/demo.js", "text/javascript"), ("/preview.js", "text/javascript"),
                               ("/demo.css", "text/css")):
        status, body, headers = harness.http("GET", site + path)
        assert status == 200 and headers["Content-Type"].startswith(content_type) and body
    status, body, _ = harness.http("GET", f"{site}/config.json?x=1")
    assert status == 200 and json.loads(body) == {"inference": "http://127.0.0.1:9080",
                                                  "management": "http://127.0.0.1:9081", "protocol": "torchserve"}
    for path in ("/server.py", "/__init__.py", "/../config.properties", "/%2e%2e/config.properties", "/demo"):
        assert harness.http("GET", site + path)[0] == 404, path
    assert harness.http("POST", f"{site}/", b"x")[0] == 501


class References(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.references = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.references += [value for name, value in attrs if name in ("src", "href")]


def test_everything_the_page_needs_is_in_the_repository():
    """No CDN: the page loads only files of demo/ (and a blank data: icon)."""
    references = References((ROOT / "demo" / "index.html").read_text()).references
    assert sorted(references) == ["data:,", "demo.css", "demo.js"]
    imports = re.findall(r"^import .* from \"(.+)\";$", (ROOT / "demo" / "demo.js").read_text(), re.MULTILINE)
    assert imports == ["./preview.js"]
    assert "import " not in (ROOT / "demo" / "preview.js").read_text().replace("export ", "")
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", (ROOT / "demo" / "demo.css").read_text())
    for name in demo.FILES.values():
        assert (ROOT / "demo" / name[0]).is_file()


def test_torchserve_allows_only_the_demos_origin():
    settings = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["cors_allowed_origin"] == demo.origin(demo.DEFAULT_HOST, demo.DEFAULT_PORT) != "*"
    assert {m.strip() for m in settings["cors_allowed_methods"].split(",")} == {"GET", "POST", "OPTIONS"}
    assert settings["cors_allowed_headers"] == "Content-Type"  # the page sends application/octet-stream


def test_the_demo_cli_says_where_the_page_is_and_refuses_a_busy_port(tmp_path):
    from helpers import assert_one_line_error, run_cli

    port = harness.free_ports(1)[0]
    busy = demo.start("127.0.0.1", port, "http://127.0.0.1:8080", "http://127.0.0.1:8081")
    try:
        result = run_cli("demo", "--port", str(port), timeout=30)
    finally:
        demo.stop(busy)
    assert_one_line_error(result, f"cannot serve the demo on 127.0.0.1:{port}", "--port")
