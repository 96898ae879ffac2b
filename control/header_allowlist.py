"""The client headers that get past the gateway's edge, and the one regex Envoy removes all others with.

envoy/envoy.yaml's `early_header_mutation_extensions` removes, before the first route is picked, every
client header whose name is not below (pseudo-headers are never touched): so nothing a client forges
(the gateway's own x-gateway-* headers, forwarded-for chains, cookies, proxy or retry controls) reaches
routing, ext_authz or an upstream, and ext_authz is sent only the few headers it reads instead of the
whole request's (each header a check carries costs Envoy several thousand instructions). Envoy's
matchers cannot negate, so the removal is one RE2 expression that matches exactly the names *not* in
the list; `python -m control.header_allowlist` prints it for this list (tests/test_edge.py checks that
envoy.yaml holds that expression).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# What an inference upstream needs from the client (accept-encoding is deliberately absent: compressed
# responses would hide usage from the access log), the gateway key, and what Envoy's own HTTP handling
# reads (framing, `Expect: 100-continue`, `Connection: close`; Envoy never forwards those itself).
EDGE_ALLOWLIST = (
    "accept",
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "expect",
    "host",
    "transfer-encoding",
    "user-agent",
    "x-request-id",
)


def keep_only_regex(names: Iterable[str]) -> str:
    """An RE2 expression (no look-arounds) matching, whole, every header name that is neither one of
    `names` nor a pseudo-header (`:path`, ...)."""
    words = sorted(set(names))
    for word in words:
        if not re.fullmatch(r"[a-z0-9-]+", word):
            raise ValueError(f"not a lower-case header name: {word!r}")
    return _other_than(words, "", root=True)


def _other_than(words: list[str], prefix: str, root: bool = False) -> str:
    """Matches every continuation s of `prefix` such that prefix + s is none of `words`."""
    here = [w[len(prefix):] for w in words if w.startswith(prefix)]
    ends_here = "" in here
    nexts = sorted({w[0] for w in here if w})
    alternatives = [] if ends_here else [""]
    excluded = "".join(nexts) + (":" if root else "")
    alternatives.append(f"[^{_in_class(excluded)}].*" if excluded else ".+")
    for c in nexts:
        # Letters, digits and "-" need no escaping outside a class.
        alternatives.append(c + "(?:" + _other_than(words, prefix + c) + ")")
    return "|".join(alternatives) if not root else "(?:" + "|".join(a for a in alternatives if a) + ")"


def _in_class(chars: str) -> str:
    # "-" last, so it is a character and not a range.
    return "".join(sorted(c for c in chars if c != "-")) + ("-" if "-" in chars else "")


if __name__ == "__main__":
    print(keep_only_regex(EDGE_ALLOWLIST))
