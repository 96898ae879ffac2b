"""The one header in which envoy/authz_request.lua states the body's facts (extauth/body_facts.py)."""

from __future__ import annotations

from extauth import body_facts
from extauth.body_facts import BodyFacts


def test_each_fact_is_read_and_the_model_unescaped() -> None:
    stated = "model=caf%C3%A9%26n%3D1%25&bytes=87&max_tokens=256&n=2&audio_seconds=1.500"
    assert body_facts.read(stated) == BodyFacts("caf\u00e9&n=1%", "87", "256", "2", "1.500", None)


def test_a_body_without_a_usable_model_states_only_what_is_wrong() -> None:
    assert body_facts.read("error=invalid_json") == BodyFacts(problem="invalid_json")


def test_no_header_no_facts_and_unknown_or_repeated_names_change_nothing() -> None:
    assert body_facts.read(None) == body_facts.read("") == BodyFacts()
    assert body_facts.read("model=a&bytes=1&model=b&bytes=2&colour=red&junk") == BodyFacts("a", "1")
    # A pair without "=" is a name with an empty value; an empty model is no model a deployment has.
    assert body_facts.read("model") == BodyFacts("")
