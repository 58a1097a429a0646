"""Run configuration: one validated pydantic model, loaded from YAML plus `key=value` overrides.

Unknown keys and wrong types are errors naming the key and the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ttm.util import diff_items, json_hash, pop_dotted, set_dotted


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Heads(_Strict):
    """A model section with `d_model` and `n_heads`: d_model must split into the heads."""

    @model_validator(mode="after")
    def _heads(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class DataConfig(_Strict):
    preset: str = "tiny"  # embedded dataset preset (ignored when `manifest` is set)
    manifest: str | None = None  # an existing manifest.jsonl (e.g. from `ttm-bench data import`)
    root: str = "data"  # where embedded datasets and token caches live
    seed: int = 0  # dataset seed (independent of the run seed)
    max_seconds: float | None = Field(None, gt=0)  # crop training clips to this length (None: whole clips)


class CodecConfig(_Strict):
    name: Literal["melrvq", "encodec", "dac"] = "melrvq"
    path: str | None = None  # hub id / local dir (encodec, dac), fitted file (melrvq)
    settings: dict[str, Any] = Field(default_factory=dict)


class TextConfig(_Strict):
    name: Literal["minilm", "flan-t5"] = "minilm"
    path: str | None = None
    max_length: int = Field(32, ge=1)


class DiffusionConfig(_Heads):
    """Stage 2 of a two-stage model: diffusion over the codec latent, conditioned on the
    stage-1 tokens (first `model.first_k` codebooks) and the text."""

    denoiser: str = "transformer"  # any registered backbone, run bidirectionally
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    target_params: int | None = Field(None, ge=1)
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    bidirectional: Literal["sum", "concat"] = "sum"  # how forward and backward passes are merged
    objective: Literal["v"] = "v"
    schedule: Literal["cosine"] = "cosine"
    sampler: Literal["ddim", "ancestral"] = "ddim"
    sample_steps: int = Field(50, ge=1)
    cfg_scale: float = 3.0
    cond_dropout: float = Field(0.1, ge=0, lt=1)
    stage2_fraction: float = Field(0.5, gt=0, lt=1)  # share of the budget (and of model.target_params) for stage 2
    target: Literal["residual", "full"] = "residual"  # residual: latent(all) - latent(first k); full: latent(all)


class ModelConfig(_Heads):
    # what one run trains (ttm/runs.py dispatches on it): lm, two_stage (a first_k LM as stage 1 +
    # latent diffusion as stage 2, two runs under RUN/stage1, RUN/stage2), or diffusion (stage 2 alone)
    kind: Literal["lm", "two_stage", "diffusion"] = "lm"
    backbone: str = "transformer"
    conditioning: Literal["prefix", "cross"] = "prefix"
    pattern: Literal["delay", "parallel", "first_k"] = "delay"
    first_k: int = Field(1, ge=1)
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    target_params: int | None = Field(None, ge=1)  # total trainable params to match (sizes `size_by`)
    size_by: Literal["n_layers", "d_model"] = "n_layers"
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    # absolute positions (ttm/positions.py): auto (attention: sinusoidal, SSMs: none), none, sinusoidal,
    # study (the reference study's sinusoid, added over [text; audio] in prefix models, SSMs included)
    positions: Literal["auto", "none", "sinusoidal", "study"] = "auto"
    dropout: float = Field(0.0, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, lt=1)  # for classifier-free guidance
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)

    @model_validator(mode="before")
    @classmethod
    def _stage2_only(cls, d: Any) -> Any:
        """Configs written before `kind: diffusion` spelled stage 2 as `kind: two_stage` +
        `diffusion.stage2_only: true`: read them as `kind: diffusion` (their runs still resume)."""
        diff = d.get("diffusion") if isinstance(d, dict) else None
        if isinstance(diff, dict) and "stage2_only" in diff:
            d = {**d, "diffusion": {k: v for k, v in diff.items() if k != "stage2_only"}}
            if diff["stage2_only"]:
                d["kind"] = "diffusion"
        return d


class Budget(_Strict):
    kind: Literal["steps", "tokens", "flops", "seconds"] = "steps"
    limit: float = Field(gt=0)


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1)  # step budget (and LR-schedule length when the budget is not in steps)
    budget: Budget | None = None  # overrides `steps` as the stopping rule
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.02, ge=0)
    warmup: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # 0: off
    ema: float | None = Field(None, gt=0, lt=1)  # EMA decay of weights used for eval/generation (None: off)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    ckpt_every: int = Field(50, ge=1)
    val_batches: int = Field(4, ge=1)
    flops_thresholds: list[float] = Field(default_factory=list)  # report FLOPs to reach these val losses
    device: str = "auto"
    bf16: bool | Literal["auto"] = "auto"  # bf16 autocast on CUDA
    threads: int | None = Field(None, ge=1)
    loggers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)  # curve mirrors of log.jsonl

    @model_validator(mode="after")
    def _budget(self):
        if self.budget is None:
            self.budget = Budget(kind="steps", limit=self.steps)
        return self


class GenerateConfig(_Strict):
    n_clips: int | None = Field(8, ge=1)  # None: the whole split
    seconds: float | None = Field(None, gt=0)  # None: the dataset's clip length
    cfg_scale: float = 3.0
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    split: str = "test"


class EvalConfig(_Strict):
    # the embedded evaluator's four families (FD, KL, CLAP-style, adherence): all offline
    metrics: list[str] = Field(default_factory=lambda: ["fd_probe", "kl_probe", "clap_probe", "adherence"])
    probe_path: str | None = None


class RunConfig(_Strict):
    name: str | None = None
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """The run's config hash (see `config_hash`)."""
        return config_hash(self)


# keys that say where a run's inputs live or what it is called, not what it computes: left out of the
# config hash, so moving a dataset (or naming a run) renames no run or grid cell
LOCATION_KEYS = ("name", "data.root")


def config_view(config: RunConfig | dict[str, Any], drop: tuple[str, ...] = LOCATION_KEYS) -> dict[str, Any]:
    """What the hashes are taken on: the validated config as a dict (a dict that is not a RunConfig,
    e.g. a user's cell function with its own keys, as it is), without the dotted keys `drop`."""
    if isinstance(config, dict):
        try:
            config = RunConfig.model_validate(config)
        except ValidationError:
            pass
    d = config.to_dict() if isinstance(config, RunConfig) else copy.deepcopy(config)
    for k in drop:
        pop_dotted(d, k)
    return d


def config_hash(config: RunConfig | dict[str, Any]) -> str:
    """THE config hash of a run: grid cell names, duplicate-cell detection, the summary's
    `config_hash` and the train CLI's default run directory all use it.

    Computed on the validated config (a dict is validated first), so spelling out a default gives
    the same hash as leaving it out; LOCATION_KEYS are left out. A dict that is not a RunConfig
    (a user's cell function with its own keys) is hashed as it is (minus LOCATION_KEYS)."""
    return json_hash(config_view(config), compact=True)


# keys that name what a comparison compares (the backbone, its own options, the seed), not the
# settings it is compared at: left out of the settings hash
IDENTITY_KEYS = ("model.backbone", "model.backbone_kwargs", "seed")
SETTINGS_DROP = LOCATION_KEYS + IDENTITY_KEYS


def settings_hash(config: RunConfig | dict[str, Any]) -> str:
    """The hash of the settings a run was made at: `config_hash` without IDENTITY_KEYS. Two runs
    with the same settings hash differ at most in backbone, backbone options and seed, so their
    numbers compare (e.g. a new backbone's grid beside shipped results)."""
    return json_hash(config_view(config, SETTINGS_DROP), compact=True)


def settings_diff(a: RunConfig | dict[str, Any], b: RunConfig | dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for each setting (IDENTITY_KEYS and LOCATION_KEYS left
    out) whose values differ; empty when the settings hashes are equal."""
    return diff_items(config_view(a, SETTINGS_DROP), config_view(b, SETTINGS_DROP))


def nearest_settings(
    config: RunConfig | dict[str, Any], references: list[RunConfig | dict[str, Any]]
) -> tuple[int, list[tuple[str, Any, Any]]]:
    """(index of the reference with the fewest differing settings, those differences as
    (key, value in config, value in the reference)). `references` must not be empty."""
    if not references:
        raise ValueError("nearest_settings: no reference configs to compare with")
    diffs = [settings_diff(config, r) for r in references]
    i = min(range(len(diffs)), key=lambda j: len(diffs[j]))
    return i, diffs[i]


def check_settings_match(
    configs: dict[str, RunConfig | dict[str, Any]],
    references: dict[str, RunConfig | dict[str, Any]],
    what: str = "reference",
    max_shown: int = 5,
) -> None:
    """Raise ValueError unless every config's `settings_hash` is one of the references'.

    `configs` and `references` are keyed by a name (a cell). The message names each mismatching
    config (one per distinct settings), the nearest reference (fewest differing settings) and each
    differing dotted key with both values, e.g. "train.lr: yours 0.001, shipped 0.002".
    """
    if not references:
        raise ValueError(f"no {what} configs to check settings against")
    ref_names = list(references)
    ref_hashes = {settings_hash(c) for c in references.values()}
    bad: dict[str, list[str]] = {}  # settings hash -> names of the configs that have it
    for name, c in configs.items():
        h = settings_hash(c)
        if h not in ref_hashes:
            bad.setdefault(h, []).append(name)
    if not bad:
        return
    parts = []
    for names in list(bad.values())[:max_shown]:
        i, diffs = nearest_settings(configs[names[0]], [references[n] for n in ref_names])
        keys = "; ".join(f"{k}: yours {a!r}, {what} {b!r}" for k, a, b in diffs[:12])
        more = f" (+{len(diffs) - 12} more keys)" if len(diffs) > 12 else ""
        also = f" (and {len(names) - 1} more with the same settings)" if len(names) > 1 else ""
        parts.append(f"{names[0]!r}{also} vs nearest {what} cell {ref_names[i]!r}: {keys}{more}")
    if len(bad) > max_shown:
        parts.append(f"... and {len(bad) - max_shown} more distinct settings")
    n = sum(len(v) for v in bad.values())
    raise ValueError(
        f"{n} of {len(configs)} run(s) were made at settings that match no {what} run "
        "(only model.backbone, model.backbone_kwargs and seed may differ): " + " | ".join(parts)
    )


# keys that may differ on resume without changing the result (logging, the budget itself)
RESUME_IGNORED = (
    "name",
    "train.steps",
    "train.budget",
    "train.log_every",
    "train.ckpt_every",
    "train.device",
    "train.threads",
    "data.root",  # where the dataset lives, not what it is (grids keep theirs under GRID/data)
    "train.loggers",
    "generate",
    "eval",
)


class _Loader(yaml.SafeLoader):
    """YAML with JSON's numbers: `1e-3` is the float 0.001 (plain YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML (numbers, booleans, lists, mappings; else a string)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def parse_assignments(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """The one KEY=VALUE parser of every verb: ["train.steps=100", "model.backbone=mamba"] ->
    {"train.steps": 100, "model.backbone": "mamba"} (values as `parse_value` reads them)."""
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {it!r}")
        try:
            out[key.strip()] = parse_value(val)
        except yaml.YAMLError as e:
            raise ValueError(f"{flag} {it!r}: the value is not valid YAML ({e})") from None
    return out


def apply_overrides(d: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """`["train.steps=100", "model.backbone=mamba"]` (see parse_assignments) or a dict of dotted keys,
    applied as grid specs apply theirs (ttm.util.set_dotted: a mapping merges into its section)."""
    items = overrides if isinstance(overrides, dict) else parse_assignments(list(overrides))
    for k, v in items.items():
        set_dotted(d, k, v)
    return d


def config_from_dict(d: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(d)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            msgs.append(f"{key}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
        raise ValueError(f"{source}: invalid config: " + "; ".join(msgs)) from None


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; a missing file or invalid YAML is an error naming `what` and the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """`read_yaml` of a file that must hold a mapping (an empty file is `{}`)."""
    d = read_yaml(path, what) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    d: dict[str, Any] = {}
    src = "<defaults>"
    if path is not None:
        d = read_yaml_mapping(path, "config file")
        src = str(path)
    if overrides:
        apply_overrides(d, overrides)
    return config_from_dict(d, src)
