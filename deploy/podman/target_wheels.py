"""Requirements the image's interpreter needs that the wheelhouse lacks (markers evaluated for it).

deploy/context.sh gathers the wheelhouse with the host's pip, which evaluates environment markers for
the host's interpreter. The smoke test's base (Debian 12, built with debootstrap) runs Python 3.11.2,
and a requirement such as redis's ``async-timeout>=4.0.3; python_full_version < '3.11.3'`` is skipped on
a newer host, so ``pip install --no-index`` fails inside the offline build. This walks the dependency
graph of the wheels from ``rnnserve`` (with the extras each requirement asks for), evaluates every
marker in the image interpreter's environment, and prints what is missing, one requirement a line,
for ``pip wheel`` to add. deploy/podman/build.sh loops until nothing is printed.

    python deploy/podman/target_wheels.py WHEELHOUSE ENVIRONMENT.json
    python deploy/podman/target_wheels.py --digest CONTEXT

ENVIRONMENT.json is ``MARKER_ENVIRONMENT_SCRIPT`` run by the image's own python3 (no packaging there).
``--digest`` prints a hash of what a build context holds (each wheel's members, not its zip timestamps,
and every other file), which deploy/podman/build.sh compares to decide whether the layer cache may be used.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# packaging.markers.default_environment(), written out: the image's interpreter has no packaging.
MARKER_ENVIRONMENT_SCRIPT = """
import json, os, platform, sys
info = sys.implementation.version
version = f"{info.major}.{info.minor}.{info.micro}"
if info.releaselevel != "final":
    version += info.releaselevel[0] + str(info.serial)
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": version,
    "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
}))
"""


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist()
                        if name.count("/") == 1 and name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode("utf-8", errors="replace")
    header = text.split("\n\n", 1)[0]
    return [Requirement(line.split(":", 1)[1].strip()) for line in header.splitlines()
            if line.startswith("Requires-Dist:")]


def _applies(marker: Marker | None, environment: dict[str, str], extras: frozenset[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))


def missing_requirements(wheelhouse: Path, environment: dict[str, str], root: str = "rnnserve") -> list[str]:
    """Every requirement reachable from ``root`` in ``environment`` whose project has no wheel.

    Version specifiers are kept, so that ``pip wheel`` fetches a version the requirer accepts; a project
    that has a wheel is taken as satisfied (the host's resolver chose that version).
    """
    requirements: dict[str, list[Requirement]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        requirements.setdefault(name, wheel_requirements(wheel))
    if canonicalize_name(root) not in requirements:
        raise SystemExit(f"no {root} wheel in {wheelhouse}")
    missing: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(root), frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for requirement in requirements[name]:
            if not _applies(requirement.marker, environment, extras):
                continue
            needed = canonicalize_name(requirement.name)
            if needed in requirements:
                todo.append((needed, frozenset(requirement.extras)))
            else:
                missing.setdefault(needed, f"{requirement.name}{requirement.specifier}")
    return sorted(missing.values())


def context_digest(context: Path) -> str:
    """sha256 over every file's path and content under ``context``, a wheel counted by its members'
    names and contents (a rebuilt wheel of the same sources has new zip timestamps, not new content)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as archive:
                for name in sorted(archive.namelist()):
                    digest.update(name.encode() + b"\0" + archive.read(name))
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    if argv[0] == "--digest":
        print(context_digest(Path(argv[1])))
        return 0
    wheelhouse, environment = Path(argv[0]), json.loads(Path(argv[1]).read_text())
    for line in missing_requirements(wheelhouse, environment):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
