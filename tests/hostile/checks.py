"""What "a clear error" means, checked the same way for every case of the corpus."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.hostile.corpus import Expect


@dataclass
class Outcome:
    """How one case ended: the API's answer and, when it started a generation, its end."""

    case_id: str
    status_code: int
    body: dict | None = None
    text: str = ""
    task_id: str | None = None
    view: dict | None = None
    ledger: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def assert_clear_error(o: Outcome, expect: Expect, *, cost: int = 10, never_echo: list[str] = ()) -> None:
    """Refused at the API with an expected status and a JSON error; or accepted and then failed
    with an expected, named error code, and every credit charged given back."""
    assert o.status_code < 500, f"{o.case_id}: the API answered {o.status_code}: {o.text[:500]}"
    for secret in never_echo:
        assert secret not in o.text, f"{o.case_id}: the answer echoes {secret[:20]!r}"
    if o.status_code != 202:
        assert o.status_code in expect.statuses, (
            f"{o.case_id}: answered {o.status_code}, expected {sorted(expect.statuses) or 'a failed generation'}: "
            f"{o.text[:500]}")
        error = (o.body or {}).get("error") or {}
        assert error.get("code") and error.get("message"), f"{o.case_id}: not a JSON error: {o.text[:300]}"
        assert len(o.text) < 8192, f"{o.case_id}: an error of {len(o.text)} characters"
        return
    assert expect.codes, f"{o.case_id}: accepted (202), expected the API to answer {sorted(expect.statuses)}"
    view = o.view or {}
    error = view.get("error") or {}
    assert view.get("status") == "failed", f"{o.case_id}: ended {view.get('status')} ({error}), expected failed"
    assert error.get("code") in expect.codes, f"{o.case_id}: failed with {error}, expected {sorted(expect.codes)}"
    assert error.get("message"), f"{o.case_id}: no message with {error.get('code')}"
    for secret in never_echo:
        assert secret not in str(view), f"{o.case_id}: the generation's error shows {secret[:20]!r}"
    assert o.ledger == (cost, cost), f"{o.case_id}: charged/refunded {o.ledger}, expected ({cost}, {cost})"
    assert view.get("credits") == {"charged": cost, "refunded": cost}, f"{o.case_id}: {view.get('credits')}"
