"""The bound on what an allowed request may carry upstream (extauth/upstream.py fits_upstream)."""

from __future__ import annotations

from extauth import upstream

LIMIT = upstream.MAX_CHECKED_HEADER_BYTES


def test_headers_over_the_byte_limit_do_not_fit() -> None:
    assert upstream.fits_upstream({"authorization": "Bearer k", "user-agent": "u" * 1000})
    assert not upstream.fits_upstream({"authorization": "Bearer k", "user-agent": "u" * LIMIT})


def test_a_size_bound_under_the_limit_spares_the_sum_and_one_over_it_falls_back_to_it() -> None:
    small = {"authorization": "Bearer k", "user-agent": "u" * 1000}
    large = {"authorization": "Bearer k", "user-agent": "u" * LIMIT}
    assert upstream.fits_upstream(small, size_bound=2000)
    # A bound over the limit says nothing either way: the headers are summed.
    assert upstream.fits_upstream(small, size_bound=LIMIT + 1)
    assert not upstream.fits_upstream(large, size_bound=LIMIT + 100)


def test_too_many_headers_do_not_fit_whatever_the_bound() -> None:
    many = {f"x-h{i}": "v" for i in range(upstream.MAX_CHECKED_HEADERS)}
    assert not upstream.fits_upstream(many, size_bound=100)
