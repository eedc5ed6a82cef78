"""Load and fully validate an exported policy bundle (``bundle.yaml`` + ONNX graphs). No torch, no MuJoCo.

:func:`load_bundle` reads the manifest's common part (:mod:`metarl_robot.runtime.manifest`), looks its
``kind`` up in the registry (:mod:`metarl_robot.runtime.kinds`) and lets that kind validate the rest and open
its graphs. It refuses, with a :class:`~metarl_robot.runtime.manifest.BundleError` naming the bundle, the field
or file and what was expected, anything it cannot fully validate: missing, unlisted or altered files, an
unknown schema version or kind, a robot spec that does not parse or whose interface hash differs, layouts that
disagree with the robot spec, graphs whose inputs and outputs are not what the runtime feeds them, and
non-finite weights. The checks run in the order of the error reference in docs/bundle_format.md, so a bundle
with several problems reports the first one.
"""

from __future__ import annotations

from pathlib import Path

from metarl_robot.runtime.kinds import UnknownKindError, bundle_kind
from metarl_robot.runtime.manifest import BundleError, LoadedBundle, read_manifest


def load_bundle(path: str | Path, threads: int = 1) -> LoadedBundle:
    """Load a bundle folder (or its bundle.yaml) of any registered kind, refusing with :class:`BundleError`
    anything it cannot validate. ``threads``: onnxruntime intra-op threads per session (inter-op 1, sequential).
    """
    path, data = read_manifest(Path(path))
    try:
        kind = bundle_kind(data.get("kind"))
    except UnknownKindError as exc:
        raise BundleError(str(path), "kind", str(exc)) from None
    return kind.load(path, data, threads)


__all__ = ["load_bundle"]
