"""Grid specs: a YAML file naming a base config, axes to vary, seeds, presets and an optional search.

    name: backbones-cpu
    base: {model.d_model: 64, train.steps: 200}      # inline config values (dotted or nested keys)
    base_config: ../configs/base.yaml                 # or/and a run-config YAML (inline `base` wins)
    axes:
      model.backbone: [transformer, mamba2]           # scalar axis: one config key, one value per cell
      arch:                                           # bundle axis: each value sets several keys
        - {label: cross-transformer, model.backbone: transformer, model.conditioning: cross}
        - {label: prefix-simba, model.backbone: simba, model.conditioning: prefix}
    seeds: [0, 1, 2]
    presets:                                          # selected with --preset; "default" when none given
      tiny: {train.steps: 20, seeds: [0], axes: {model.backbone: [transformer]}}
    search:                                           # optional: Optuna TPE instead of one run per cell
      n_trials: 20
      metric: val_loss                                # a summary field, or metrics.<name>
      direction: minimize
      params:
        train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
        model.n_layers: {low: 2, high: 8, type: int}
        model.pattern: {choices: [delay, parallel]}

A cell's config is base_config <- base <- preset <- one value per axis <- seed, as a plain nested
dict. An axis whose values are all mappings is a bundle axis (to sweep a dict-valued key, write
bundles: `[{model.backbone_kwargs: {d_state: 16}}, ...]`). A preset may also replace the value
lists of named axes (`axes:`) and the seeds (`seeds:`).
In search mode each combination of axis values is one group, searched separately.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ttm.config import config_from_dict, config_hash, read_yaml, read_yaml_mapping
from ttm.util import deep_merge, normalize

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PRESET_RESERVED = ("axes", "seeds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ParamRange(_Strict):
    """One searched parameter: a numeric range (`low`, `high`, `log`, `step`) or `choices`."""

    type: Literal["float", "int", "categorical"] | None = None
    low: int | float | None = None  # written as integers (and no type): an int range
    high: int | float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.choices is not None:
            if self.type not in (None, "categorical"):
                raise ValueError("`choices` goes with type categorical")
            if not self.choices:
                raise ValueError("`choices` is empty")
            self.type = "categorical"
            return self
        if self.low is None or self.high is None:
            raise ValueError("give `low` and `high`, or `choices`")
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.type is None:
            self.type = "int" if isinstance(self.low, int) and isinstance(self.high, int) else "float"
        if self.type == "categorical":
            raise ValueError("type categorical needs `choices`")
        return self


class SearchSpec(_Strict):
    n_trials: int = Field(ge=1)
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    params: dict[str, ParamRange]
    sampler_seed: int = 0

    @field_validator("params")
    @classmethod
    def _params(cls, v):
        if not v:
            raise ValueError("search.params is empty: name at least one parameter range")
        for k in v:
            if not _KEY.match(k):
                raise ValueError(f"search parameter {k!r} is not a dotted config key")
        return v


class GridSpec(_Strict):
    name: str
    description: str = ""
    base_config: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search: SearchSpec | None = None
    source: str = "<inline>"  # the file it was read from (set by load_spec)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"name {v!r}: use letters, digits, '.', '_' and '-'")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ValueError("seeds is empty")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds has duplicates: {v}")
        return v

    @field_validator("axes")
    @classmethod
    def _axes(cls, v):
        for name, values in v.items():
            _check_axis(name, values)
        return v

    @model_validator(mode="after")
    def _presets(self):
        for pname, p in self.presets.items():
            for k, val in p.items():
                if k == "axes":
                    if not isinstance(val, dict):
                        raise ValueError(f"presets.{pname}.axes: expected a mapping axis -> values")
                    for ax, values in val.items():
                        if ax not in self.axes:
                            raise ValueError(
                                f"presets.{pname}.axes.{ax}: no such axis (axes: {list(self.axes)})"
                            )
                        _check_axis(ax, values)
                elif k == "seeds":
                    if not isinstance(val, list) or not val or not all(isinstance(s, int) for s in val):
                        raise ValueError(f"presets.{pname}.seeds: expected a non-empty list of integers")
                elif not _KEY.match(k):
                    raise ValueError(f"presets.{pname}.{k}: not a dotted config key")
        return self


def _check_axis(name: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ValueError(f"axis {name!r}: expected a non-empty list of values")
    kinds = {isinstance(x, dict) for x in values}
    if len(kinds) > 1:
        raise ValueError(f"axis {name!r}: mixes bundles (mappings) and plain values")
    if kinds == {True}:
        for b in values:
            keys = [k for k in b if k != "label"]
            if not keys:
                raise ValueError(f"axis {name!r}: a bundle sets no key: {b}")
            for k in keys:
                if not _KEY.match(str(k)):
                    raise ValueError(f"axis {name!r}: bundle key {k!r} is not a dotted config key")
    elif not _KEY.match(name):
        raise ValueError(f"axis {name!r}: a plain-value axis must be named by a dotted config key")


# ----------------------------------------------------------------------------- loading


def _format_errors(e: ValidationError, source: str) -> str:
    msgs = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown key {key!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"{key}: {msg}")
    return f"{source}: invalid grid spec: " + "; ".join(msgs)


def parse_spec(data: Any, source: str = "<inline>") -> GridSpec:
    """Validate a spec given as a dict; errors name the key and `source`."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level of the grid spec")
    if "source" in data:
        raise ValueError(f"{source}: invalid grid spec: unknown key 'source'")
    try:
        return GridSpec.model_validate({**data, "source": source})
    except ValidationError as e:
        raise ValueError(_format_errors(e, source)) from None


def load_spec(path: str | Path) -> GridSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid spec {path} does not exist")
    return parse_spec(read_yaml(path, "grid spec"), str(path))


__all__ = ["config_hash"]  # the one config hash (ttm.config), re-exported for grid code


# ----------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Cell:
    """One run of a grid: base + one value per axis + a seed."""

    index: int
    name: str  # run-dir name: "<slug>-<hash>"
    hash: str  # config_hash(config): of the validated config when it is a RunConfig
    seed: int
    axes: dict[str, str]  # axis -> value label
    overrides: dict[str, Any]  # dotted key -> value, applied on the base
    config: dict[str, Any]  # the resolved nested config (without `name`)
    group: str  # axis labels without the seed: "axis=label|axis=label" ("all" when no axes)
    params: dict[str, Any] = field(default_factory=dict)  # searched values (search mode)

    def run_config(self) -> dict[str, Any]:
        """The config handed to the cell function: the resolved config plus `name`."""
        return {**copy.deepcopy(self.config), "name": self.name}

    def manifest(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "hash": self.hash,
            "seed": self.seed,
            "axes": self.axes,
            "group": self.group,
            "overrides": self.overrides,
            "params": self.params,
            "config": self.config,
        }


def _label(value: Any) -> str:
    if isinstance(value, dict):
        if "label" in value:
            return str(value["label"])
        return ",".join(f"{str(k).rsplit('.', 1)[-1]}={_label(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_label(v) for v in value) + "]"
    return str(value)


def _axis_overrides(axis: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "label"}
    return {axis: value}


def group_key(axes: dict[str, str]) -> str:
    return "|".join(f"{a}={v}" for a, v in axes.items()) or "all"


def _slug(labels: list[str], limit: int = 48) -> str:
    s = "-".join(labels) or "cell"
    s = re.sub(r"[^A-Za-z0-9._=-]+", "_", s).strip("_") or "cell"
    return s[:limit].rstrip("_-.")


def resolve_base(spec: GridSpec) -> dict[str, Any]:
    """base_config (relative to the spec file, then the working dir) <- inline base."""
    base: dict[str, Any] = {}
    if spec.base_config:
        p = Path(spec.base_config)
        if not p.is_absolute() and spec.source != "<inline>":
            near = Path(spec.source).parent / p
            p = near if near.exists() else p
        if not p.is_file():
            raise FileNotFoundError(f"{spec.source}: base_config {spec.base_config} does not exist")
        base = normalize(read_yaml_mapping(p, "base_config"))
    return deep_merge(base, spec.base)


def preset_parts(spec: GridSpec, preset: str | None) -> tuple[str | None, dict, dict, list[int]]:
    """(preset name used, config overrides, axes after the preset, seeds after the preset)."""
    if preset is None and "default" in spec.presets:
        preset = "default"
    if preset is None:
        return None, {}, dict(spec.axes), list(spec.seeds)
    if preset not in spec.presets:
        have = ", ".join(spec.presets) or "none"
        raise ValueError(f"{spec.source}: no preset {preset!r} (presets: {have})")
    p = spec.presets[preset]
    overrides = {k: v for k, v in p.items() if k not in _PRESET_RESERVED}
    axes = {**spec.axes, **p.get("axes", {})}
    return preset, overrides, axes, list(p.get("seeds", spec.seeds))


def make_cell(
    index: int,
    base: dict,
    axes: dict[str, str],
    overrides: dict[str, Any],
    seed: int,
    params: dict[str, Any] | None = None,
) -> Cell:
    config = deep_merge(copy.deepcopy(base), {**overrides, **(params or {}), "seed": seed})
    config.pop("name", None)  # the runner names each run after its cell
    h = config_hash(config)
    labels = list(axes.values()) + [f"{k.rsplit('.', 1)[-1]}={_label(v)}" for k, v in (params or {}).items()]
    name = f"{_slug(labels + [f's{seed}'])}-{h}"
    return Cell(
        index=index,
        name=name,
        hash=h,
        seed=seed,
        axes=dict(axes),
        overrides={**overrides, "seed": seed},
        config=config,
        group=group_key(axes),
        params=dict(params or {}),
    )


def expand_groups(
    spec: GridSpec, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Every combination of axis values: [(axis -> label, dotted overrides: preset, axes, `overrides`)]."""
    _, pre, axes, _ = preset_parts(spec, preset)
    out = []
    for combo in itertools.product(*axes.values()):
        labels, ov = {}, dict(pre)
        for axis, value in zip(axes, combo):
            labels[axis] = _label(value)
            ov.update(_axis_overrides(axis, value))
        ov.update(overrides or {})
        out.append((labels, ov))
    return out


def expand(spec: GridSpec, preset: str | None = None, overrides: dict[str, Any] | None = None) -> list[Cell]:
    """One cell per (seed, axis combination); seeds outermost so a partial grid covers every group.

    `overrides` (dotted keys, e.g. from `--set`) apply to every cell, over the preset and the axes.
    """
    base = resolve_base(spec)
    _, _, _, seeds = preset_parts(spec, preset)
    groups = expand_groups(spec, preset, overrides)
    cells, seen = [], {}
    for seed in seeds:
        for labels, ov in groups:
            cell = make_cell(len(cells), base, labels, ov, seed)
            if cell.hash in seen:
                raise ValueError(
                    f"{spec.source}: cells {seen[cell.hash]!r} and {cell.name!r} resolve to the same config "
                    "(does a preset or bundle override an axis?)"
                )
            seen[cell.hash] = cell.name
            cells.append(cell)
    return cells


def validate_run_configs(cells: list[Cell], source: str) -> None:
    """Check every cell's config against the harness's RunConfig before anything runs."""
    for c in cells:
        config_from_dict(c.run_config(), f"{source} (cell {c.name})")
