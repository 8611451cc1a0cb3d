"""What a wheel folder downloaded on this host still lacks for the image's Python.

pip evaluates environment markers for the Python that runs it, even under ``--python-version``
(pypa/pip#11010), so ``pip download`` on a host with Python 3.11.7 leaves out what Debian
bookworm's 3.11.2 in the image needs: redis asks for async-timeout below 3.11.3, and the offline
``pip install --no-index`` in the image then fails. tools/docker_smoke.sh asks the image's Python
for its marker environment, then this module for the requirements that no wheel in the folder
meets under it, and downloads those until none is left.

    python image_wheels.py environment > env.json            # run by the image's Python
    python tools/image_wheels.py missing WHEELS REQS env.json  # one unmet requirement a line

``environment`` uses the standard library only (the image has nothing else yet).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path


def environment() -> dict[str, str]:
    """This interpreter's PEP 508 marker environment."""
    implementation = sys.implementation
    version = implementation.version
    implementation_version = f"{version.major}.{version.minor}.{version.micro}"
    if version.releaselevel != "final":
        implementation_version += f"{version.releaselevel[0]}{version.serial}"
    return {
        "implementation_name": implementation.name,
        "implementation_version": implementation_version,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    }


def missing(wheels: Path, requirements: list[str], env: dict[str, str]) -> list[str]:
    """The requirements (the top-level ones and those of the wheels they pick, markers evaluated
    under ``env``) that no wheel in ``wheels`` meets, without their markers."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    found: dict[str, list[tuple[Version, Path]]] = {}
    for wheel in wheels.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        found.setdefault(name, []).append((version, wheel))

    unmet: list[str] = []
    visited: set[tuple[Path, frozenset[str]]] = set()
    # Each requirement with the extras its wheel was asked for ("" : none).
    queue = [(Requirement(line), frozenset({""})) for line in requirements if line.strip()]
    while queue:
        requirement, extras = queue.pop()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({**env, "extra": e}) for e in extras):
            continue
        candidates = [
            (version, wheel)
            for version, wheel in found.get(canonicalize_name(requirement.name), [])
            if requirement.specifier.contains(version, prereleases=True)
        ]
        if not candidates:
            requirement.marker = None
            if str(requirement) not in unmet:
                unmet.append(str(requirement))
            continue
        wheel = max(candidates)[1]
        asked = frozenset({"", *requirement.extras})
        if (wheel, asked) in visited:
            continue
        visited.add((wheel, asked))
        queue.extend((Requirement(line), asked) for line in requires_dist(wheel))
    return unmet


def requires_dist(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(
            n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        )
        metadata = HeaderParser().parsestr(archive.read(name).decode("utf-8"))
    return metadata.get_all("Requires-Dist") or []


def main(argv: list[str]) -> int:
    if argv[:1] == ["environment"] and len(argv) == 1:
        print(json.dumps(environment(), indent=1))
        return 0
    if argv[:1] == ["missing"] and len(argv) == 4:
        wheels, requirements, env = Path(argv[1]), Path(argv[2]), Path(argv[3])
        lines = requirements.read_text().splitlines()
        for requirement in missing(wheels, lines, json.loads(env.read_text())):
            print(requirement)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
