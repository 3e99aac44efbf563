"""The pull commands the page offers to copy, in the forms this host accepts (DESIGN.md, the one
namespace): containerd and crictl by the upstream name through the mirror that
``regproxy containerd-config`` writes, and docker, skopeo or ctr by the project path on this host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from regproxy.names import RepoName
from regproxy.oci import is_digest_reference


@dataclass(frozen=True, slots=True)
class PullCommand:
    label: str
    command: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "command": self.command}


def reference(name: str, ref: str) -> str:
    return f"{name}@{ref}" if is_digest_reference(ref) else f"{name}:{ref}"


def commands(repo: RepoName, ref: str, host: str, *, tls: bool) -> list[PullCommand]:
    """Pull commands for ``repo`` at a tag or digest; ``host`` is this registry as the browser
    reached it (``node1:30003``)."""
    here = reference(f"{host}/{repo.canonical}", ref)
    out = []
    if repo.host is not None:
        upstream = reference(f"{repo.host}/{repo.path}", ref)
        out.append(PullCommand("crictl (through the containerd mirror)", f"crictl pull {upstream}"))
        out.append(
            PullCommand(
                "ctr (through the containerd mirror)",
                f"ctr images pull --hosts-dir /etc/containerd/certs.d {shlex.quote(upstream)}",
            )
        )
    plain = "" if tls else "--plain-http "
    out.append(PullCommand("ctr (this host)", f"ctr images pull {plain}{shlex.quote(here)}"))
    skopeo_tls = "" if tls else "--src-tls-verify=false "
    out.append(
        PullCommand(
            "skopeo", f"skopeo copy {skopeo_tls}docker://{shlex.quote(here)} oci-archive:image.tar"
        )
    )
    out.append(PullCommand("docker", f"docker pull {shlex.quote(here)}"))
    out.append(PullCommand("reference", here))
    return out
