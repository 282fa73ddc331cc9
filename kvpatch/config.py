"""Pipeline configuration: pydantic models, YAML loading, bundled config names.

`load_config` accepts a path, a bundled config name ("default"), a dict, or a `PipelineConfig`,
and either returns a fully validated config or raises one `ConfigError` that names the source,
the field path and what was expected. YAML is read with `yaml.safe_load` semantics, hardened for
files from users (`kvpatch.config_yaml`): no aliases, bounded size and depth, no duplicate keys; errors
quote at most `ECHO_LIMIT` characters of any value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError, model_validator

from .config_yaml import read_yaml
from .errors import ConfigError, echo
from .params import Fraction
from .registry import Stage, StageSpec, get_stage_class, get_stage_spec
from .resources import bundled_dir
from .stage_specs.reuse import shared_key_problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StageConfig(_Strict):
    """One stage of the pipeline: which kind of job, which implementation, its params."""

    kind: str
    impl: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_and_valid(self) -> "StageConfig":
        _check_params(self)
        return self

    def stage_spec(self) -> StageSpec:
        """The stage's declaration: all that validation needs (no implementation is imported)."""
        return get_stage_spec(self.kind, self.impl)

    def stage_class(self) -> type[Stage]:
        return get_stage_class(self.kind, self.impl)

    def build(self) -> Stage:
        cls = self.stage_class()
        return cls(cls.Params.model_validate(self.params))


def _check_params(stage: StageConfig) -> None:
    """Re-raise a params validation failure as a ValueError pydantic can place under the stage."""
    try:
        stage.stage_spec().Params.model_validate(stage.params)
    except ValidationError as err:
        problems = _listed([_format_error(e, prefix="params") for e in err.errors()], "; ")
        raise ValueError(f"{stage.kind}/{stage.impl}: {problems}") from None


class KernelConfig(_Strict):
    """Which attention implementation computes attention over the cache.

    `triton`: in decode, the fused Triton kernel reads full-precision and KIVI-packed K/V directly
    (kvpatch/kernels/triton_decode.py); prefill, and anything the kernel cannot run (no CUDA, no
    Triton, soft-capping), goes to `sdpa`/`torch` with the reason logged once.
    """

    attention: Literal["sdpa", "torch", "triton"] = "sdpa"


class CompileConfig(_Strict):
    """torch.compile options, applied to the model's decoder (`model.base_model`) by `apply`."""

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    #: Replay each one-token decode step as a CUDA graph when every cache layer is static
    #: (`storage/dense` with `static`, `storage/quantized` with `capacity_tokens`); needs
    #: `kernels.attention: triton` (the torch kernels read lengths on the host). Eager elsewhere.
    cuda_graphs: bool = False


class FidelityConfig(_Strict):
    """What a config promises about outputs; the config-matrix tests and the harness check it."""

    lossless: bool = True
    min_logit_cosine: Fraction | None = None
    min_top1_agreement: Fraction | None = None
    max_ppl_ratio: Annotated[float, Strict(), Field(ge=1.0, allow_inf_nan=False)] | None = None


class PipelineConfig(_Strict):
    """A validated pipeline: ordered stages plus kernel, compile and fidelity options."""

    name: str = Field(min_length=1)
    description: str = ""
    stages: list[StageConfig] = Field(default_factory=list)
    kernels: KernelConfig = Field(default_factory=KernelConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)

    _source: str = PrivateAttr(default="<object>")

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.compile.cuda_graphs and self.kernels.attention != "triton":
            raise ValueError("compile.cuda_graphs needs kernels.attention: triton (the fused kernel reads the "
                             f"valid length on the device), got {self.kernels.attention!r}")
        storage = [s for s in self.stages if s.kind == "storage"]
        if len(storage) > 1:
            raise ValueError(f"at most one storage stage is allowed, found {len(storage)}")
        builders = [f"{s.kind}/{s.impl}" for s in self.stages
                    if s.stage_spec().builds_layers and (s.kind, s.impl) != ("storage", "dense")]
        if len(builders) > 1:
            raise ValueError(f"these stages each build the cache layers and cannot be combined: {', '.join(builders)}")
        kinds = {s.kind for s in self.stages}
        for s in self.stages:
            missing = [kind for kind in s.stage_spec().requires if kind not in kinds]
            if missing:
                raise ValueError(f"stage {s.kind}/{s.impl} needs a {' and a '.join(missing)} stage in the same config")
        shared_keys = shared_key_problems([(s.kind, s.impl, s.params) for s in self.stages])
        if shared_keys:
            raise ValueError(shared_keys[0])
        lossy = [f"{s.kind}/{s.impl}" for s in self.stages
                 if not s.stage_spec().is_lossless(s.stage_spec().Params.model_validate(s.params))]
        if self.fidelity.lossless and lossy:
            raise ValueError(
                f"fidelity.lossless is true but these stages are lossy: {', '.join(lossy)}; "
                "set fidelity.lossless: false and declare bounds"
            )
        return self

    @property
    def source(self) -> str:
        """Where the config came from (file path, bundled name, '<dict>')."""
        return self._source

    def stages_of(self, kind: str) -> list[StageConfig]:
        return [s for s in self.stages if s.kind == kind]

    def digest(self) -> str:
        """Stable SHA-256 of the config's content (not its source), for fingerprints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any], PipelineConfig]


#: Most problems one ConfigError lists (a file of a thousand bad keys gets a short message).
MAX_LISTED_PROBLEMS = 20


def _format_error(error: Mapping[str, Any], prefix: str = "") -> str:
    loc = ".".join(_loc_part(part) for part in (prefix, *error["loc"]) if part != "")
    message = str(error["msg"]).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown key (not allowed here)"
    elif error.get("type") == "missing":
        message = "required field is missing"
    elif "input" in error and error.get("type") not in ("value_error",):
        message += f" (got {echo(error['input'])})"
    return f"{loc or '<top level>'}: {message}"


def _loc_part(part: object) -> str:
    """A field path element; keys come from the user, so long ones are cut like values."""
    text = str(part)
    return text if len(text) <= 40 else echo(text, 40)


def _listed(problems: list[str], separator: str) -> str:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return separator.join(shown) + (f"{separator}... and {more} more" if more else "")


def validate_config(data: Any, source: str = "<dict>") -> PipelineConfig:
    """Validate already-parsed data; one ConfigError lists every problem with its field path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid kvpatch config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        config = PipelineConfig.model_validate(dict(data))
    except ValidationError as err:
        problems = _listed([f"  - {_format_error(e)}" for e in err.errors()], "\n")
        raise ConfigError(f"invalid kvpatch config {source}:\n{problems}") from None
    config._source = source
    return config


def bundled_configs() -> dict[str, Path]:
    """Bundled config names (file stems in `configs/`) and their files."""
    return {p.stem: p for p in sorted(bundled_dir("configs").glob("*.yaml"))}


def resolve_config_path(source: str | os.PathLike[str]) -> Path:
    """A path to an existing file, or the file of a bundled config name."""
    path = Path(source)
    if path.is_file():
        return path
    bundled = bundled_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    # "configs/default.yaml" from another working directory still means the bundled file.
    if name in bundled and (len(path.parts) == 1 or path.parent.name == "configs"):
        return bundled[name]
    raise ConfigError(
        f"kvpatch config {str(source)!r} not found: it is neither an existing file nor a bundled config "
        f"name; bundled configs: {', '.join(bundled) or '(none)'}"
    )


def load_config(source: ConfigSource) -> PipelineConfig:
    """Load and validate a pipeline config from a path, bundled name, dict or PipelineConfig."""
    if isinstance(source, PipelineConfig):
        return source
    if isinstance(source, Mapping):
        return validate_config(source, "<dict>")
    if isinstance(source, (str, os.PathLike)):
        path = resolve_config_path(source)
        return validate_config(read_yaml(path), str(path))
    raise ConfigError(
        f"cannot load a kvpatch config from {type(source).__name__}: expected a path, a bundled config "
        "name, a dict or a PipelineConfig"
    )
