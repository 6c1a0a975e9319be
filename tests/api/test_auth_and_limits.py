"""API keys (Bearer), what stays open without one, CORS, and that keys never reach the logs."""

from __future__ import annotations

import logging

import pytest

from tests.api import assert_error
from tests.conftest import app_client

KEYS = ("key-alpha-3f9c1e8d", "key-beta-77d2b0aa")
WRONG = "key-gamma-00000000"
ORIGIN = "http://example.test"
GOOD = {"prompt": "hi", "gen_length": 8, "steps": 8}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tiny_model):
    with app_client(tiny_model, api_key=KEYS) as client:
        yield client


def preflight(client, path: str = "/v1/generate", origin: str = ORIGIN):
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


# ---------------------------------------------------------------------------- API keys


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer(WRONG),
        bearer(KEYS[0] + "x"),
        bearer(KEYS[0][:-1]),
        {"Authorization": KEYS[0]},  # no scheme
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": KEYS[0]},
    ],
    ids=["none", "wrong", "longer", "prefix", "no-scheme", "basic", "empty", "other-header"],
)
def test_missing_or_wrong_key_is_401(keyed, headers):
    for response in (
        keyed.post("/v1/generate", json=GOOD, headers=headers),
        keyed.get("/v1/models", headers=headers),
        keyed.post("/v1/tokenize", json={"prompt": "a"}, headers=headers),
        keyed.post("/v1/loglikelihood", json={"requests": [{"context": "a", "continuation": " b"}]}, headers=headers),
    ):
        error = assert_error(response, 401, "authentication_error", None)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].lower().startswith("bearer")


def test_401_comes_before_body_checks(keyed):
    """Unauthenticated callers learn nothing about the body's validity."""
    response = keyed.post("/v1/generate", content=b"not json", headers={"content-type": "text/plain"})
    assert_error(response, 401, "authentication_error")
    assert_error(keyed.get("/v1/nothing"), 401, "authentication_error")


@pytest.mark.parametrize("key", KEYS)
def test_either_key_is_accepted(keyed, key):
    assert keyed.get("/v1/models", headers=bearer(key)).status_code == 200
    response = keyed.post("/v1/generate", json=GOOD, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert len(response.json()["token_ids"]) == 8
    assert (
        keyed.post("/v1/tokenize", json={"prompt": "a"}, headers={"authorization": f"bearer {key}"}).status_code == 200
    )


def test_health_is_open(keyed):
    response = keyed.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_metrics_open_by_default(keyed):
    response = keyed.get("/metrics", follow_redirects=False)
    assert response.status_code == 200
    assert "llada_rejected_total" in response.text


def test_metrics_auth(tiny_model):
    with app_client(tiny_model, api_key=KEYS, metrics_auth=True) as client:
        assert_error(client.get("/metrics"), 401, "authentication_error")
        assert_error(client.get("/metrics", headers=bearer(WRONG)), 401, "authentication_error")
        assert client.get("/metrics", headers=bearer(KEYS[1]), follow_redirects=False).status_code == 200
        assert client.get("/health").status_code == 200


def test_no_keys_configured_means_open(client):
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers=bearer(WRONG)).status_code == 200


def test_unauthorized_requests_are_counted(keyed):
    keyed.get("/v1/models")
    text = keyed.get("/metrics").text
    line = next(line for line in text.splitlines() if line.startswith('llada_rejected_total{reason="unauthorized"}'))
    assert float(line.split()[-1]) >= 1


def test_keys_never_logged(tiny_model, caplog):
    caplog.set_level(logging.DEBUG)  # root: every logger that propagates
    for name in ("llada", "llada.api", "llada.requests", "llada.engine", "uvicorn", "fastapi", "httpx"):
        caplog.set_level(logging.DEBUG, logger=name)
    with app_client(tiny_model, api_key=KEYS) as client:
        assert client.post("/v1/generate", json=GOOD, headers=bearer(KEYS[0])).status_code == 200
        assert client.post("/v1/generate", json={**GOOD, "stream": True}, headers=bearer(KEYS[1])).status_code == 200
        assert (
            client.post(
                "/v1/loglikelihood",
                json={"requests": [{"context": "a", "continuation": " b"}], "mc_num": 2},
                headers=bearer(KEYS[1]),
            ).status_code
            == 200
        )
        assert client.post("/v1/generate", json=GOOD, headers=bearer(WRONG)).status_code == 401
        assert client.post("/v1/generate", json=GOOD, headers={"Authorization": KEYS[0]}).status_code == 401
        assert client.post("/v1/generate", json={**GOOD, "steps": 0}, headers=bearer(KEYS[0])).status_code == 422
        assert client.get("/v1/nothing", headers=bearer(KEYS[0])).status_code == 404
    assert caplog.records, "nothing was logged: the capture is not working"
    assert any(r.name.startswith("llada") for r in caplog.records)
    for record in caplog.records:
        rendered = " ".join([record.getMessage(), repr(record.args), repr(vars(record))])
        for secret in (*KEYS, WRONG):
            assert secret not in rendered, f"{secret!r} logged by {record.name}: {record.getMessage()}"
    for secret in (*KEYS, WRONG):
        assert secret not in caplog.text


# ---------------------------------------------------------------------------- CORS


def test_cors_off_by_default(client):
    response = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)
    assert not any(h.startswith("access-control-") for h in preflight(client).headers)


def test_cors_for_configured_origin(tiny_model):
    with app_client(tiny_model, cors_origin=(ORIGIN,)) as client:
        response = preflight(client)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in response.headers["access-control-allow-methods"]
        allowed = response.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed

        simple = client.post("/v1/tokenize", json={"prompt": "a"}, headers={"Origin": ORIGIN})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == ORIGIN

        # Another origin gets no grant.
        other = "http://elsewhere.test"
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": other}).headers
        denied = preflight(client, origin=other)
        assert denied.headers.get("access-control-allow-origin") != other


def test_cors_preflight_needs_no_api_key(tiny_model):
    """Browsers never send Authorization on a preflight, so it must pass without a key; otherwise
    a browser client can never reach a keyed server."""
    with app_client(tiny_model, api_key=KEYS, cors_origin=(ORIGIN,)) as client:
        response = preflight(client)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == ORIGIN
        keyed = client.post("/v1/tokenize", json={"prompt": "a"}, headers={"Origin": ORIGIN, **bearer(KEYS[0])})
        assert keyed.status_code == 200
        assert keyed.headers["access-control-allow-origin"] == ORIGIN


def test_cors_headers_on_gate_errors(tiny_model):
    """A 401 (or 413/415/503) from the gate must carry the CORS grant, or the browser hides the error."""
    with app_client(tiny_model, api_key=KEYS, cors_origin=(ORIGIN,)) as client:
        response = client.post("/v1/tokenize", json={"prompt": "a"}, headers={"Origin": ORIGIN})
        assert_error(response, 401, "authentication_error")
        assert response.headers.get("access-control-allow-origin") == ORIGIN
