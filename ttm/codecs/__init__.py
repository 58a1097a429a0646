"""Audio codecs: `melrvq` (offline default, fitted on the train split), `encodec`, `dac`.

codec = build_codec("melrvq", path="tokens/melrvq.safetensors")
codec = build_codec("encodec", path="facebook/encodec_32khz", n_codebooks=4)
codec = load_codec("dac:/models/dac_44khz")      # or a melrvq file, or a model directory
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ttm.codecs.base import Codec

CODECS = ("melrvq", "encodec", "dac")
DEFAULT_MODELS = {"encodec": "facebook/encodec_24khz", "dac": "descript/dac_44khz"}

__all__ = ["CODECS", "Codec", "build_codec", "load_codec"]


def build_codec(name: str, **settings: Any) -> Codec:
    """A codec by name.

    melrvq: `path=` loads a fitted codec file (other settings may only change Griffin-Lim);
            without it the codec is built unfitted from the settings (call `.fit(wavs)`).
    encodec / dac: `path=` a hub id or local directory (default: DEFAULT_MODELS[name]),
            `n_codebooks=`, `device=`.
    """
    if name == "melrvq":
        from ttm.codecs.melrvq import MelRVQCodec

        path = settings.pop("path", None)
        MelRVQCodec.check_settings(settings)
        return MelRVQCodec.load(path, **settings) if path else MelRVQCodec(**settings)
    if name in ("encodec", "dac"):
        from ttm.codecs.hf import DacCodec, EncodecCodec

        cls = EncodecCodec if name == "encodec" else DacCodec
        path = settings.pop("path", None) or DEFAULT_MODELS[name]
        allowed = {"n_codebooks", "device"}
        if set(settings) - allowed:
            raise ValueError(
                f"{name}: unknown settings {sorted(set(settings) - allowed)}; expected {sorted(allowed)}"
            )
        return cls(path, **settings)
    raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODECS)}")


def load_codec(path_or_spec: str | os.PathLike, **settings: Any) -> Codec:
    """A codec from `NAME`, `NAME:PATH_OR_ID`, a melrvq codec file, or a transformers model directory
    (its config.json `model_type` must be encodec or dac)."""
    spec = str(path_or_spec)
    name, sep, rest = spec.partition(":")
    if name in CODECS:
        return build_codec(name, **({"path": rest} if sep and rest else {}), **settings)
    p = Path(spec).expanduser()
    if p.is_file():
        return build_codec("melrvq", path=p, **settings)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{p}: not a codec directory (no config.json)")
        try:
            model_type = json.loads(cfg.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg}: invalid JSON ({e})") from e
        if model_type not in ("encodec", "dac"):
            raise ValueError(f"{cfg}: model_type {model_type!r} is not a supported codec (encodec, dac)")
        return build_codec(model_type, path=str(p), **settings)
    raise FileNotFoundError(
        f"codec {spec!r}: not a codec name ({', '.join(CODECS)}), NAME:PATH spec, file or directory"
    )
