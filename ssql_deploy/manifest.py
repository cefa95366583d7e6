"""Stage manifests: the file that commits a stage, read back as a typed object.

A stage writes its artifacts first and its `manifest.json` last: inputs and outputs with sha256,
every setting, its metrics, package versions and the git commit. So a manifest whose outputs
hash to the files beside it proves those files are complete and checked; anything else (no
manifest, another hash, a failed status) is a file that must not be measured as if it shipped.
"""

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ssql_deploy.errors import UserError
from ssql_deploy.run import git_commit, sha256_file, versions, write_text_atomic

MANIFEST = "manifest.json"


class FileRecord(BaseModel):
    path: str
    sha256: str

    def matches(self, path: Path | None = None) -> bool:
        """Whether `path` (by default the recorded one) is still the file that was hashed."""
        target = Path(self.path) if path is None else path
        return target.is_file() and sha256_file(target) == self.sha256


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str
    created: str
    inputs: dict[str, FileRecord]
    outputs: dict[str, FileRecord]
    settings: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str] = {}
    git_commit: str | None = None
    host: dict[str, Any] = {}

    def output_named(self, filename: str) -> FileRecord | None:
        return next((r for r in self.outputs.values() if Path(r.path).name == filename), None)


def _records(paths: dict[str, Path]) -> dict[str, FileRecord]:
    """Absolute paths: a later stage, run from another directory, must find the file a record names."""
    return {k: FileRecord(path=str(p.resolve()), sha256=sha256_file(p)) for k, p in paths.items() if p.is_file()}


def write_manifest(
    stage_dir: Path,
    stage: str,
    inputs: dict[str, Path],
    settings: dict[str, Any],
    metrics: dict[str, Any],
    outputs: dict[str, Path] | None = None,
) -> Manifest:
    manifest = Manifest(
        stage=stage, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), inputs=_records(inputs), outputs=_records(outputs or {}),
        settings=settings, metrics=metrics, versions=versions(), git_commit=git_commit(),
        host={"machine": platform.machine(), "cpus": os.cpu_count()},
    )  # fmt: skip
    write_text_atomic(stage_dir / MANIFEST, json.dumps(manifest.model_dump(mode="json"), indent=2, default=str) + "\n")
    return manifest


def read_manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest, None when it has none (never committed); an unreadable one is a UserError."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"manifest {path} is unreadable ({first})", "re-run that stage to write it again") from None


def unverified_reason(path: Path) -> str | None:
    """Why `path` is not a committed output of its stage (None when it is): no manifest, not listed, or changed since."""
    try:
        manifest = read_manifest(path.parent)
    except UserError as exc:
        return exc.problem
    if manifest is None:
        return f"no {MANIFEST} beside it (a stage that did not finish, or a file from elsewhere)"
    record = manifest.output_named(path.name)
    if record is None:
        return f"its {MANIFEST} does not list it"
    if not record.matches(path):
        return f"it changed after its {MANIFEST} was written (sha256 differs)"
    return None
