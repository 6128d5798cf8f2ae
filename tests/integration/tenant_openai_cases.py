"""The tenant cases of ``/openai/v1`` (the OpenAI-compatible API), for ``test_tenants``' walk.

Sent with the official ``openai`` client, which authenticates with ``Authorization: Bearer``.
Bob aims at alice's run (``run:<id>``) and checkpoints (``<run_id>/<name>``, ``tinker://``):
each is not found, worded as a missing one, and her run is unchanged; the model list shows each
tenant only its own; alice's own requests succeed; no key, or a wrong one, is a 401.
"""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from tests.integration.tenant_world import KEYS, World

Case = Callable[[World], None]
CASES: dict[tuple[str, str], Case] = {}
PREFIX = "/openai/v1"
MISSING_RUN = "run_0123456789abcdef0123456789abcdef"


def route(method: str, rule: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES[(method, PREFIX + rule)] = fn
        return fn

    return add


def client(w: World, who: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=w.svc.base_url + PREFIX, api_key=KEYS.get(who, "wrong-key"), max_retries=0
    )


def not_found(
    w: World, who: str, call: Callable[[openai.OpenAI, str], object], foreign: str, missing: str
) -> None:
    """``call`` on another tenant's model answers exactly as on a missing one (404)."""
    with pytest.raises(openai.NotFoundError) as theirs:
        call(client(w, who), foreign)
    with pytest.raises(openai.NotFoundError) as none:
        call(client(w, who), missing)
    expected = dict(none.value.body)  # ty: ignore[no-matching-overload]
    expected["message"] = expected["message"].replace(missing, foreign)
    assert theirs.value.body == expected


def refuses_no_key(w: World, call: Callable[[openai.OpenAI], object]) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        call(client(w, "nobody"))
    assert (
        isinstance(caught.value.body, dict) and caught.value.body["type"] == "authentication_error"
    )


def _chat(c: openai.OpenAI, model: str):
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )


@route("GET", "/models")
def _models(w: World) -> None:
    def ids(who: str) -> set[str]:
        return {m.id for m in client(w, who).models.list()}

    alice, bob, admin = ids("alice"), ids("bob"), ids("admin")
    assert {f"run:{w.a_run}", w.a_state, w.a_sampler, w.a_model} <= alice
    assert not any(w.b_run in i for i in alice)
    assert {f"run:{w.b_run}", w.b_state} <= bob
    assert not any(w.a_run in i for i in bob) and w.a_model not in bob
    assert {f"run:{w.a_run}", f"run:{w.b_run}", w.a_state, w.b_state} <= admin
    refuses_no_key(w, lambda c: c.models.list())


@route("GET", "/models/<path:model>")
def _model(w: World) -> None:
    not_found(w, "bob", lambda c, m: c.models.retrieve(m), f"run:{w.a_run}", f"run:{MISSING_RUN}")
    not_found(w, "bob", lambda c, m: c.models.retrieve(m), w.a_state, f"{MISSING_RUN}/s1")
    assert client(w, "alice").models.retrieve(f"run:{w.a_run}").id == f"run:{w.a_run}"
    refuses_no_key(w, lambda c: c.models.retrieve("tiny-gpt2"))


@route("POST", "/completions")
def _completions(w: World) -> None:
    from tests.integration.test_tenants import untouched

    call = lambda c, m: c.completions.create(model=m, prompt="Hi", max_tokens=3)  # noqa: E731
    with untouched(w):
        not_found(w, "bob", call, f"run:{w.a_run}", f"run:{MISSING_RUN}")
        not_found(w, "bob", call, w.a_state, f"{MISSING_RUN}/s1")
        tinker = f"tinker://{w.a_run}/weights/s1"
        not_found(w, "bob", call, tinker, f"tinker://{MISSING_RUN}/weights/s1")
    for model in (f"run:{w.a_run}", w.a_state, f"tinker://{w.a_run}/weights/s1"):
        assert call(client(w, "alice"), model).choices[0].finish_reason in ("stop", "length")
    assert call(client(w, "bob"), "tiny-gpt2").choices
    refuses_no_key(w, lambda c: call(c, "tiny-gpt2"))


@route("POST", "/chat/completions")
def _chat_completions(w: World) -> None:
    from tests.integration.test_tenants import untouched

    with untouched(w):
        not_found(w, "bob", _chat, f"run:{w.a_run}", f"run:{MISSING_RUN}")
        not_found(w, "bob", _chat, w.a_sampler, f"{MISSING_RUN}/smp")
    for model in (f"run:{w.a_run}", w.a_sampler):
        assert _chat(client(w, "alice"), model).choices[0].message.role == "assistant"
    refuses_no_key(w, lambda c: _chat(c, "tiny-gpt2"))
