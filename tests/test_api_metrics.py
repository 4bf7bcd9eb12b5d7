"""/metrics labels come from known sets only (issue 10 #9): a client's random HTTP methods
and paths must not create new series."""

from __future__ import annotations

import random
import string

from prometheus_client.parser import text_string_to_metric_families

from tests.api_fixtures import Api, api  # noqa: F401 - api is a fixture

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}

REQUEST_METRICS = ("atelier_api_requests", "atelier_api_request_duration_seconds")


def _labels(text: str, label: str) -> set[str]:
    values = set()
    for family in text_string_to_metric_families(text):
        if family.name in REQUEST_METRICS:
            values |= {sample.labels[label] for sample in family.samples if label in sample.labels}
    return values


def _route_templates(app) -> set[str]:
    """The app's route templates: those of its OpenAPI schema, and the few kept out of it."""
    return set(app.openapi()["paths"]) | {"/", "/studio", "/metrics", "/healthz", "/readyz"}


async def test_random_methods_and_paths_create_no_new_series(api: Api) -> None:
    rng = random.Random(10)
    token_chars = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
    methods = {"".join(rng.choice(token_chars) for _ in range(rng.randint(1, 12))) for _ in range(60)}
    methods |= {"get", "Post", "PROPFIND", "CONNECT", "TRACE", "BREW"}
    paths = ["/v1/generations", "/v1/generations/gen_x", "/healthz", "/nope/" + "x" * 40]
    for i, method in enumerate(sorted(methods)):
        answer = await api.http.request(method, paths[i % len(paths)] + f"?r={rng.random()}")
        assert answer.status_code < 500, (method, answer.status_code, answer.text)
    for i in range(30):
        await api.http.get(f"/random/{rng.getrandbits(64):x}/{i}")

    text = (await api.http.get("/metrics")).text
    seen_methods = _labels(text, "method")
    assert seen_methods <= KNOWN_METHODS | {"other"}, seen_methods - KNOWN_METHODS
    assert "other" in seen_methods and "GET" in seen_methods
    seen_routes = _labels(text, "route")
    assert seen_routes <= _route_templates(api.app) | {"unmatched"}, seen_routes - _route_templates(api.app)
    assert not any("random" in route or "gen_x" in route for route in seen_routes)
    seen_statuses = _labels(text, "status")
    assert all(s.isdigit() and 100 <= int(s) <= 599 for s in seen_statuses), seen_statuses

