"""``PROTOCOL_DIR/manifest.json``: which stage of a protocol is done, how often it was tried, how long it ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..rundir import read_json, write_json

MANIFEST_VERSION = 1


class Manifest:
    """``PROTOCOL_DIR/manifest.json``: one entry per stage with its status, attempts and wall time.

    Only the protocol's own process writes it (stage processes never do), so there is no
    concurrent writer; each write replaces the file atomically.
    """

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load_or_create(cls, path: Path, kind: str, config: dict[str, Any]) -> Manifest:
        if path.is_file():
            data = read_json(path)
            if data.get("format_version") != MANIFEST_VERSION or data.get("kind") != kind:
                raise UserError(f"{path} is not a {kind} protocol manifest of this version; choose another --save")
            return cls(path, data)
        return cls(path, {"format_version": MANIFEST_VERSION, "kind": kind, "config": config, "stages": {},
                          "selection": None})

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.stages[name]

    def is_done(self, name: str) -> bool:
        return name in self.stages and self.stages[name]["status"] == "done"

    def save(self) -> None:
        write_json(self.path, self.data)

