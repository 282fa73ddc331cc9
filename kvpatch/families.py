"""Per-family patch specs: the declarative data in `patches/*.yaml`, validated and looked up.

A family is supported only if a spec lists its `model_type`; everything else is refused with a
reason (from `patches/unsupported.yaml`) or as "not verified". Specs carry the attention quirks
(softcap, sliding window, non-standard scaling) that the patch layer must honour.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .config import PipelineConfig, read_yaml
from .errors import ConfigError, UnsupportedModelError
from .resources import bundled_dir


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionQuirks(_Strict):
    """What the family's attention does beyond plain causal softmax(q k^T / sqrt(d)) v."""

    gqa: bool = True
    softcap: bool = False
    sliding_window: bool = False
    custom_scaling: bool = False
    #: Learned attention sinks (`s_aux`): an extra softmax logit per query head, no value.
    sinks: bool = False


class ConfigRefusal(_Strict):
    """A config feature this family cannot run exactly, refused at `apply` with `reason`: a
    `kernels.attention` value, or any stage of a kind (e.g. `chunker`: chunk reuse)."""

    kernel: str | None = None
    stage_kind: str | None = None
    reason: str

    def matches(self, config: PipelineConfig) -> bool:
        if self.kernel is not None and config.kernels.attention == self.kernel:
            return True
        return self.stage_kind is not None and any(stage.kind == self.stage_kind for stage in config.stages)


class FamilySpec(_Strict):
    """One supported family, as declared in `patches/<family>.yaml`."""

    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...] = ()
    attention: AttentionQuirks = AttentionQuirks()
    refuses: tuple[ConfigRefusal, ...] = ()
    #: Why a cache of this family cannot be exported or imported as a snapshot (None: it can).
    refuses_snapshots: str | None = None
    notes: str = ""

    def accepts_stage_kind(self, kind: str) -> bool:
        """Whether configs with a stage of `kind` may run on this family at all."""
        return not any(refusal.stage_kind == kind for refusal in self.refuses)

    def config_problems(self, config: PipelineConfig) -> list[str]:
        """Why `config` cannot run exactly on this family (empty if it can)."""
        return [refusal.reason for refusal in self.refuses if refusal.matches(config)]


class UnsupportedFamily(_Strict):
    model_types: tuple[str, ...]
    reason: str


class _UnsupportedFile(_Strict):
    unsupported: tuple[UnsupportedFamily, ...]


def _load(path: Path, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(read_yaml(path))
    except ValidationError as err:
        raise ConfigError(f"invalid patch spec {path}: {err}") from None


@lru_cache(maxsize=1)
def _specs() -> tuple[dict[str, FamilySpec], dict[str, str]]:
    folder = bundled_dir("patches")
    supported: dict[str, FamilySpec] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "unsupported.yaml":
            continue
        spec = _load(path, FamilySpec)
        for model_type in spec.model_types:
            supported[model_type] = spec
    refused = {}
    unsupported_file = folder / "unsupported.yaml"
    if unsupported_file.exists():
        for entry in _load(unsupported_file, _UnsupportedFile).unsupported:
            refused.update({model_type: entry.reason for model_type in entry.model_types})
    return supported, refused


def supported_families() -> dict[str, FamilySpec]:
    """Supported `model_type` values and their specs."""
    return dict(_specs()[0])


def family_spec(model_type: str) -> FamilySpec:
    """The spec for `model_type`, or an UnsupportedModelError that says why not."""
    supported, refused = _specs()
    if model_type in supported:
        return supported[model_type]
    known = ", ".join(sorted(supported))
    if model_type in refused:
        raise UnsupportedModelError(
            f"kvpatch does not support model_type {model_type!r}: {refused[model_type]} Supported: {known}."
        )
    raise UnsupportedModelError(
        f"kvpatch has not verified model_type {model_type!r}, so it refuses to patch it rather than risk "
        f"silently wrong outputs. Supported: {known}. To add a family, add patches/<family>.yaml and run "
        "the exactness tests."
    )
