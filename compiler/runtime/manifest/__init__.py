"""The engine manifest: records (`records`), their schema (`schema`), and loading with file checks (`verify`)."""

from nnslim.compiler.runtime.manifest.records import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CandidateRecord,
    EngineManifest,
    FileRecord,
    IORecord,
    ModelSpec,
    ParityRecord,
    SelectionRecord,
    TensorRecord,
    TensorRTRecord,
    Tolerance,
    rebuild_hint,
)
from nnslim.compiler.runtime.manifest.schema import ManifestError, TamperedEngineError, parse_manifest
from nnslim.compiler.runtime.manifest.verify import inside, load_manifest, manifest_digest, read_verified, verify_files

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "CandidateRecord", "EngineManifest", "FileRecord", "IORecord",
    "ManifestError", "ModelSpec", "ParityRecord", "SelectionRecord", "TamperedEngineError", "TensorRTRecord",
    "TensorRecord", "Tolerance", "inside", "load_manifest", "manifest_digest", "parse_manifest", "rebuild_hint",
    "read_verified",
    "verify_files",
]
