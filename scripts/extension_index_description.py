"""Write the extension's description for Slicer's Extensions Index from the top-level CMakeLists.txt.

The index (github.com/Slicer/ExtensionsIndex) holds one ``<ExtensionName>.json`` per extension, checked against the
catalog entry schema v1.0.2: where the source is (``scm_url``, ``scm_revision``), the category, the extensions it
needs to build, its build subdirectory and tier. Everything else a user sees (homepage, description, icon,
screenshots, contributors) the index's checks read from the top-level CMakeLists.txt itself. This script makes the
JSON from the CMakeLists' ``project()`` and ``EXTENSION_*`` values, so the two cannot disagree:

    python scripts/extension_index_description.py          # write Resources/ExtensionsIndex/<project>.json
    python scripts/extension_index_description.py --check  # exit 1 when the file differs from what it would write

It also lists what the index's checks will still refuse in this repository (a placeholder address, no licence file,
a repository name without the ``Slicer`` prefix). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "Resources" / "ExtensionsIndex"
SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
PLACEHOLDER_SUFFIX = ".invalid"
"""A host ending so (RFC 2606: reserved, never resolves) marks an address the project does not have yet."""
SCM_REVISION = "main"
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")


def cmake_metadata(text: str) -> dict[str, str]:
    """``project()`` name (key ``PROJECT``) and every ``set(EXTENSION_* value)`` of a CMakeLists text."""
    text = re.sub(r"#[^\n\"]*(?=\n)", "", text)  # comments (none of the values holds a '#')
    project = re.search(r"\bproject\s*\(\s*([^\s)]+)", text, re.IGNORECASE)
    values = {"PROJECT": project.group(1).strip("\"'") if project else ""}
    for name, quoted, bare in re.findall(r"\bset\s*\(\s*(EXTENSION_\w+)\s+(?:\"([^\"]*)\"|([^\s)]*))\s*\)", text):
        values[name] = quoted if quoted or not bare else bare
    return values


def description(metadata: dict[str, str]) -> dict:
    """The Extensions Index entry (catalog entry schema v1.0.2) the metadata describe."""
    depends = metadata.get("EXTENSION_DEPENDS", "NA")
    entry = {
        "$schema": SCHEMA,
        "build_dependencies": [] if depends in ("", "NA") else depends.split(),
        "build_subdirectory": metadata.get("EXTENSION_BUILD_SUBDIRECTORY", "."),
        "category": metadata["EXTENSION_CATEGORY"],
        "scm_revision": SCM_REVISION,
        "scm_url": metadata["EXTENSION_HOMEPAGE"].rstrip("/") + ".git",
        "tier": int(metadata.get("EXTENSION_TIER", "1")),
    }
    return dict(sorted(entry.items()))


def description_text(metadata: dict[str, str]) -> str:
    """The file's text as the index formats its files (two-space indent, LF, a final newline)."""
    return json.dumps(description(metadata), indent=2) + "\n"


def is_placeholder(url: str) -> bool:
    return (urlsplit(url).hostname or "").endswith(PLACEHOLDER_SUFFIX)


def still_refused(metadata: dict[str, str], repo: Path = REPO) -> list[str]:
    """What the index's checks (scripts/check_description_files.py there) will refuse in this repository."""
    problems = []
    if is_placeholder(metadata["EXTENSION_HOMEPAGE"]):
        problems.append("no public address yet: EXTENSION_HOMEPAGE, EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS "
                        "use the placeholder host (see the comment in CMakeLists.txt), and so does scm_url")
    if not any((repo / name).is_file() for name in LICENSE_NAMES):
        problems.append(f"no licence file at the repository root (one of {', '.join(LICENSE_NAMES)})")
    repository = Path(urlsplit(metadata["EXTENSION_HOMEPAGE"]).path).name
    if not repository.startswith("Slicer"):
        problems.append(f"the repository name {repository!r} should start with 'Slicer' (e.g. Slicer{repository})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the file in the repository")
    args = parser.parse_args(argv)
    metadata = cmake_metadata((REPO / "CMakeLists.txt").read_text())
    path = OUTPUT_DIR / f"{metadata['PROJECT']}.json"
    text = description_text(metadata)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path.relative_to(REPO)} differs from CMakeLists.txt: run {Path(__file__).relative_to(REPO)}")
            return 1
        print(f"{path.relative_to(REPO)} matches CMakeLists.txt")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    for problem in still_refused(metadata):
        print(f"the Extensions Index will refuse: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
