"""The page's files as HTTP serves them: their content types and security headers, that the page
loads nothing but its own files, that it is open when API keys are set (its API calls are not),
and that --no-ui turns it off. The page's behaviour in a browser: tests/e2e/test_page.py."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from server.api.ui import PAGE_FILES
from tests.api import assert_error
from tests.conftest import app_client


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [found[name] for name in ("src", "href") if found.get(name)]
        if tag == "script" and "src" not in found:
            self.inline_scripts += 1
        assert not any(name.startswith("on") for name in found), f"inline handler on <{tag}>"


@pytest.mark.parametrize("path", PAGE_FILES)
def test_each_page_file_has_its_type_and_the_security_headers(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == PAGE_FILES[path][1]
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy


def test_the_page_loads_only_its_own_files_and_has_no_inline_script(client):
    links = Links()
    links.feed(client.get("/").text)
    assert links.urls and set(links.urls) <= set(PAGE_FILES), links.urls
    assert links.inline_scripts == 0


def test_the_page_is_open_with_api_keys_but_the_api_is_not(tiny_model):
    with app_client(tiny_model, api_key=("page-test-key",)) as client:
        for path in PAGE_FILES:
            assert client.get(path).status_code == 200, path
        assert_error(client.get("/v1/models"), 401, "authentication_error")


def test_no_ui_answers_the_page_with_the_404_envelope(tiny_model):
    with app_client(tiny_model, no_ui=True) as client:
        for path in PAGE_FILES:
            assert_error(client.get(path), 404, "invalid_request_error", None, "not_found")
        assert client.get("/v1/models").status_code == 200
