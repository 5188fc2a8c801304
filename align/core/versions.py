"""The library versions alignmerge needs, checked once at the start of every command.

The lower bounds are read from the installed package's own metadata (pyproject.toml's `dependencies`), so they are
written once; CI tests the lowest of them (constraints/lowest.txt). A version below its bound fails with one line
naming the package, the installed version and the required one, instead of an unexpected keyword argument deep in
a trainer.
"""

from __future__ import annotations

import importlib.metadata as md

from align.core.errors import AlignError

CHECKED = ("torch", "transformers", "trl", "peft", "accelerate")


def required_versions(distribution: str = "alignmerge") -> dict[str, str]:
    """{package: specifier} for the checked packages, from the distribution's requirements."""
    from packaging.requirements import Requirement

    try:
        requirements = md.requires(distribution) or []
    except md.PackageNotFoundError:  # running from a source tree that was never installed: nothing to go by
        return {}
    wanted: dict[str, str] = {}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is None and requirement.name in CHECKED:
            wanted[requirement.name] = str(requirement.specifier)
    return wanted


def installed_version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def check_library_versions(required: dict[str, str] | None = None) -> None:
    """Raise AlignError for the first checked package that is missing or outside its specifier."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    for package, specifier in (required if required is not None else required_versions()).items():
        installed = installed_version(package)
        if installed is None:
            raise AlignError(f"{package} is not installed; alignmerge needs {package}{specifier} "
                             f"(pip install '{package}{specifier}')")
        try:
            # a local build tag (2.13.0+cpu) does not make a release older or newer
            version = Version(Version(installed).public)
        except InvalidVersion:
            continue
        if not SpecifierSet(specifier).contains(version, prereleases=True):
            raise AlignError(f"{package} {installed} is installed; alignmerge needs {package}{specifier} "
                             f"(pip install -U '{package}{specifier}')")
