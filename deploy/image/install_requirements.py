#!/usr/bin/env python3
"""Install this project's few extra Python packages into the NGC TensorRT-LLM image without
changing a single package the image already has.

The base image (nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3) ships TensorRT-LLM
1.2.1 with the torch, transformers, numpy, protobuf ... it was built and tested with. A plain
`pip install` of our pins would replace some of them and break TensorRT-LLM. So:

* every distribution installed in the image becomes a constraint `name==version`: pip may
  not upgrade, downgrade or remove any of them, for our packages or their dependencies;
* a requirement line `name==version` means "the image's version if it has one, else this
  pin": the pin applies only to packages the image lacks;
* a requirement line with no version (`torch`) means "the image must provide it": we never
  install it ourselves, and its absence fails the build;
* after pip has run, every distribution that was there before must still be there at the
  same version, or the build fails naming it.

If the image's versions make a pin impossible (say our new package needs a newer protobuf
than the image has), pip fails with the conflict and the build stops; nothing is clobbered.

    python3 install_requirements.py REQUIREMENTS [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[A-Za-z0-9,._ -]+\])?"
                   r"(?:==(?P<version>[A-Za-z0-9.+!_-]+))?$")
_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+!_-]*$")


def canonical(name: str) -> str:
    """PEP 503 normalised name: pip treats Foo_Bar, foo-bar and foo.bar as one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> list[tuple[str, str, str | None]]:
    """(name, extras, version or None) for each line; `#` starts a comment."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise SystemExit(f"requirements line {number}: expected `name`, `name==version` or "
                             f"`name[extras]==version`, got {line!r}")
        out.append((match["name"], match["extras"] or "", match["version"]))
    return out


def installed() -> dict[str, str]:
    """canonical name -> version of every distribution this interpreter sees (first on sys.path wins)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in found:
            found[canonical(name)] = dist.version
    return found


def plan(requirements: list[tuple[str, str, str | None]], present: dict[str, str]):
    """(pip arguments, constraint lines, report lines, missing image-only names)."""
    args, report, missing = [], [], []
    for name, extras, version in requirements:
        key = canonical(name)
        if key in present:
            # Named without a version: satisfied by the image's own, held by its constraint.
            # Extras still pull their dependencies in, under the same constraints.
            args.append(f"{name}{extras}")
            kept = f" (pin {version} not used)" if version and version != present[key] else ""
            report.append(f"keep    {name}=={present[key]} from the image{kept}")
        elif version is None:
            missing.append(name)
        else:
            args.append(f"{name}{extras}=={version}")
            report.append(f"install {name}{extras}=={version} (absent from the image)")
    # Versions pip cannot parse as PEP 440 cannot be constraints; the after-check still guards them.
    constraints = sorted(f"{name}=={version}" for name, version in present.items()
                         if _VERSION.match(version))
    return args, constraints, report, missing


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [f"{name} {version} -> {after.get(name, 'removed')}"
            for name, version in sorted(before.items()) if after.get(name) != version]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("requirements", type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = p.parse_args(argv)

    before = installed()
    pip_args, constraints, report, missing = plan(parse_requirements(args.requirements.read_text()),
                                                  before)
    print("\n".join(report))
    if missing:
        print(f"error: the base image must provide {', '.join(missing)} (never installed from PyPI "
              "here, to keep the image's own build)", file=sys.stderr)
        return 1
    if args.dry_run or not pip_args:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="image-constraints-") as f:
        f.write("\n".join(constraints) + "\n")
        f.flush()
        command = [sys.executable, "-m", "pip", "install", "--no-cache-dir",
                   "--disable-pip-version-check", "--constraint", f.name, *pip_args]
        print("+", " ".join(command), flush=True)
        result = subprocess.run(command, check=False)
    if result.returncode:
        print("error: pip could not install these packages alongside the image's own versions "
              "(its message is above); nothing of the image was changed", file=sys.stderr)
        return result.returncode
    after = installed()
    problems = changed(before, after)
    if problems:
        print("error: installing changed packages of the base image: " + "; ".join(problems),
              file=sys.stderr)
        return 1
    added = sorted(f"{name}=={version}" for name, version in after.items() if name not in before)
    print("added: " + (", ".join(added) or "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
