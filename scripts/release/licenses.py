"""Collect the licences of the wheels in a release: licenses.py WHEELS_DIR OUT_DIR.

For every distribution (name and version; a 3.11 and a 3.12 wheel of it are one) the licence
files of its ``.dist-info`` (``licenses/``, and ``LICENSE*``, ``LICENCE*``, ``COPYING*``,
``NOTICE*``, ``AUTHORS*``) go to ``OUT_DIR/<name>-<version>/``, and ``OUT_DIR/README.txt`` lists
each distribution with the licence its metadata declares (``License-Expression``, else
``License``, else the ``License ::`` classifiers). Output depends only on the wheels' contents.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath

LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def declared(metadata: str) -> str:
    msg = HeaderParser().parsestr(metadata)
    if msg.get("License-Expression"):
        return str(msg["License-Expression"]).strip()
    text = str(msg.get("License") or "").strip()
    if text and text.upper() != "UNKNOWN" and "\n" not in text and len(text) <= 80:
        return text
    classifiers = [
        c.split("::")[-1].strip()
        for c in msg.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return ", ".join(classifiers)
    return "(first line) " + text.splitlines()[0] if text else "not declared"


def licence_files(z: zipfile.ZipFile, dist_info: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in sorted(z.namelist()):
        if not name.startswith(dist_info + "/") or name.endswith("/"):
            continue
        rel = PurePosixPath(name[len(dist_info) + 1 :])
        if rel.parts[0] == "licenses" and len(rel.parts) > 1:
            out[str(PurePosixPath(*rel.parts[1:]))] = z.read(name)
        elif len(rel.parts) == 1 and rel.name.upper().startswith(LICENCE_PREFIXES):
            out[rel.name] = z.read(name)
    return out


def main(wheels: Path, out: Path) -> int:
    seen: dict[str, str] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        key = f"{name}-{version}"
        if key in seen:
            continue
        with zipfile.ZipFile(wheel) as z:
            dist_info = next(
                n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info")
            )
            licence = declared(z.read(f"{dist_info}/METADATA").decode("utf-8", "replace"))
            files = licence_files(z, dist_info)
        for rel, data in files.items():
            dest = out / key / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        seen[key] = licence + ("" if files else "  [no licence file in the wheel]")
    out.mkdir(parents=True, exist_ok=True)
    width = max(len(k) for k in seen)
    lines = [
        "Licences of the software in this archive, as each distribution declares it.",
        "The full texts are in the directory of the same name.",
        "",
        *(f"{k.ljust(width)}  {v}" for k, v in sorted(seen.items(), key=lambda kv: kv[0].lower())),
    ]
    (out / "README.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: licenses.py WHEELS_DIR OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
