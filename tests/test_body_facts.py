"""How ext_authz reads the body's facts Envoy hands it (extauth/body_facts.py)."""

from __future__ import annotations

import pytest

from extauth import body_facts
from extauth.body_facts import BodyFacts

JSON = {"content-type": "application/json"}


def checked(value: str, **headers: str) -> BodyFacts:
    return body_facts.from_headers({**JSON, **headers, body_facts.HEADER: value})


def test_a_json_bodys_facts_are_its_size_model_budget_and_choices() -> None:
    stated = '87 {"max_tokens":256,"model":"caf\u00e9 & \\"x\\"","n":2}'.encode().decode("latin-1")
    assert checked(stated) == BodyFacts('caf\u00e9 & "x"', "87", "256", "2")


def test_the_budget_prefers_max_completion_tokens_then_max_tokens_then_max_output_tokens() -> None:
    assert checked('9 {"model":"m","max_tokens":5,"max_completion_tokens":7}').max_tokens == "7"
    assert checked('9 {"model":"m","max_output_tokens":3}').max_tokens == "3"
    assert checked('9 {"model":"m","max_tokens":4,"max_output_tokens":3}').max_tokens == "4"


@pytest.mark.parametrize("value", ["5.5", "-1", "true", '"7"', "2147483648", "null"])
def test_a_count_no_request_could_mean_is_left_to_the_upstream(value: str) -> None:
    facts = checked(f'9 {{"model":"m","max_tokens":{value},"n":{value}}}')
    assert (facts.max_tokens, facts.choices) == (None, None)
    assert checked('9 {"model":"m","max_tokens":12.0}').max_tokens == "12"  # a whole number, as JSON may write it


def test_a_body_without_a_string_model_states_what_is_wrong() -> None:
    assert checked('9 {"model":5}').problem == "model_type"
    assert checked('9 {"model":true}').problem == "model_type"
    assert checked('9 {"unparsed":true}').problem == "invalid_json"
    assert checked('9 {"unparsed":true}', **{"content-type": "text/plain"}).problem == "not_json"
    # `{}`, `[...]` and `{"model": null}` look alike here: the admin port reads such a body.
    assert checked('2 {"no_model":true}') == BodyFacts(body_bytes="2", problem=body_facts.UNKNOWN)


def test_no_header_no_facts_and_a_damaged_one_keeps_only_the_size() -> None:
    assert body_facts.from_headers(JSON) == BodyFacts()
    assert checked("") == BodyFacts()
    assert checked("87") == BodyFacts(body_bytes="87")
    assert checked("87 {not json") == BodyFacts(body_bytes="87")
    assert checked(' {"model":"m"}') == BodyFacts("m")  # no content-length (a chunked body)


def test_a_voice_form_is_read_from_its_own_header_first() -> None:
    form = "model=caf%C3%A9%26n%3D1%25&bytes=87&audio_seconds=1.500&model=b&colour=red&junk"
    assert checked('87 {"unparsed":true}', **{body_facts.FORM_HEADER: form}) == BodyFacts(
        "caf\u00e9&n=1%", "87", None, None, "1.500")
    assert body_facts.read_form("form=1") == BodyFacts()  # a form without a model: ask for one


def test_over_grpc_the_namespace_and_the_stated_size_say_the_same() -> None:
    assert body_facts.from_headers(JSON, {"model": "m", "max_tokens": 256.0, "n": 2.0}, "87") == BodyFacts(
        "m", "87", "256", "2")
    assert body_facts.from_headers(JSON, {}, "87") == BodyFacts(body_bytes="87")


@pytest.mark.parametrize(
    ("body", "shape"),
    [
        (b'[{"model": "m"}]', "not_object"),
        (b'  "just a string"', "not_object"),
        (b"5", "not_object"),
        (b'{"model": null}', "model_type"),
        (b'{"model": ["m"], "messages": []}', "model_type"),
        (b'{"model": {"a": 1}}', "model_type"),
        (b'{"messages": [{"model": 1}]}', None),  # a nested `model` is not the body's
        (b"{}", None),
        (b"", None),
    ],
)
def test_the_admin_port_names_what_is_wrong_with_a_body_without_a_model(body: bytes, shape: str | None) -> None:
    assert body_facts.shape_of(body, complete=True) == shape


def test_a_body_too_large_to_parse_is_judged_by_its_first_character() -> None:
    assert body_facts.shape_of(b" [" + b"1," * 10, complete=False) == "not_object"
    assert body_facts.shape_of(b'{"model": null, ', complete=False) is None
