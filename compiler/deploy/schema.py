"""Triton's own schema for model configurations (`tritonclient`'s `model_config_pb2`, the `triton`
extra), the export's error, and version policies (`latest:N`, `all`, `specific:1,3`) read into
and written from `ModelVersionPolicy` and checked against the version folders a model has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnslim.errors import NnslimError
from nnslim.extras import missing_extra


class TritonExportError(NnslimError):
    """An engine that cannot be exported, a configuration Triton would refuse, or a destination that
    would be overwritten."""


def _schema() -> tuple[Any, Any]:
    """Triton's `model_config_pb2` and protobuf's `text_format` (the `triton` extra)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise missing_extra("tritonclient", "Triton model configurations (export-triton)") from exc
    return model_config_pb2, text_format


def parse_version_policy(text: str) -> Any:
    """`latest:N`, `all` or `specific:V1,V2,...` as Triton's `ModelVersionPolicy`."""
    pb, _ = _schema()
    policy = pb.ModelVersionPolicy()
    spec = text.strip().lower()
    kind, _, value = spec.partition(":")
    try:
        if spec == "all":
            policy.all.SetInParent()
        elif kind == "latest" and int(value) >= 1:
            policy.latest.num_versions = int(value)
        elif kind == "specific" and (versions := [int(v) for v in value.split(",")]) and min(versions) >= 1:
            policy.specific.versions.extend(sorted(set(versions)))
        else:
            raise ValueError
    except ValueError:
        raise TritonExportError(f"version policy {text!r}: use latest:N (N >= 1), all, or specific:1,3 "
                                "(positive version numbers)") from None
    return policy


def version_policy_text(config: Any) -> str | None:
    """A config's version policy written as `parse_version_policy` reads it (None: not set, Triton's
    default `latest:1`)."""
    if not config.HasField("version_policy"):
        return None
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return f"latest:{policy.latest.num_versions}"
    if choice == "specific":
        return "specific:" + ",".join(str(v) for v in policy.specific.versions)
    return "all" if choice == "all" else None


def _check_specific(version_policy: str, versions: list[int], target: Path) -> None:
    policy = parse_version_policy(version_policy)
    missing = sorted(set(policy.specific.versions) - set(versions))
    if missing:
        raise TritonExportError(f"version policy {version_policy!r} names version(s) {missing}, which {target} "
                                f"would not have (versions: {versions})")
