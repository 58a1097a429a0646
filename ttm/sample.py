"""Generation of clips for a list of captions (`ttm-bench generate` is ttm/runs.py).

Writes one WAV per caption and `samples.jsonl` rows `{file, caption, seed, attributes}`, plus
`ref_id` (the reference clip's manifest id) for split-driven prompts.
Sampling is recurrent (backbone state / KV cache, one step per token) with classifier-free
guidance as one batched pass of conditional + null captions.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from backbones.ops import fused_cpu
from ttm.audio import save_audio
from ttm.config import GenerateConfig, RunConfig
from ttm.lm import uses_cfg
from ttm.progress import bar as progress_bar
from ttm.text import encode_captions
from ttm.util import atomic_write_text


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "clip"


def read_prompts(path: Path) -> list[dict]:
    """A text file (one caption per line) or JSONL (`caption` and optional `attributes`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if "caption" not in d:
                raise ValueError(f"{path}:{i}: missing field 'caption'")
            out.append({"caption": d["caption"], "attributes": d.get("attributes", {})})
        else:
            out.append({"caption": line, "attributes": {}})
    return out


def write_clips(out_dir: Path, prompts: list[dict], wav: torch.Tensor, sample_rate: int, first_index: int,
                seed: int, truncated: list[bool] | None = None) -> list[dict]:
    """Save one WAV per prompt (`wav [b, C, N]`); returns their samples.jsonl rows."""
    rows = []
    for j, p in enumerate(prompts):
        name = f"{first_index + j:04d}-{_slug(p['caption'])}.wav"
        save_audio(Path(out_dir) / name, wav[j], sample_rate)
        rows.append({"file": name, "caption": p["caption"], "seed": seed, "index": j,
                     "attributes": p.get("attributes", {}),
                     **({"ref_id": p["id"]} if p.get("id") is not None else {}),  # eval pairs KL 1:1 by it
                     **({"caption_truncated": True} if truncated and truncated[j] else {})})
    return rows


def check_output_dir(out_dir: Path, what: str = "--out") -> Path:
    """Fail before any work when `out_dir` cannot hold the results (a file, or not writable)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{what} {out_dir}: is a file, expected a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {out_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {out_dir}: not writable")
    return out_dir


LONG_WARN, LONG_REFUSE = 2.0, 10.0  # clip length vs the training clip: warn above, refuse above


def check_clip_length(n_frames: int, trained_frames: int | None, frame_rate: float, allow_long: bool) -> None:
    """A model sampled far beyond the length it was trained on drifts, and sampling is linear in
    length: warn past LONG_WARN x the training clip, refuse past LONG_REFUSE x unless `allow_long`."""
    if not trained_frames:
        return
    ratio = n_frames / trained_frames
    msg = (f"{n_frames / frame_rate:.1f} s clips are {ratio:.1f}x the {trained_frames / frame_rate:.1f} s "
           "the model was trained on")
    if ratio > LONG_REFUSE and not allow_long:
        raise ValueError(f"--seconds: {msg} (more than {LONG_REFUSE:g}x); pass --allow-long to generate them anyway")
    if ratio > LONG_WARN:
        print(f"warning: {msg}; quality past the training length is untested", file=sys.stderr)


def render_prompts(
    prompts: list[dict],
    encoder,
    out_dir: Path,
    codec,
    n_frames: int,
    render: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    seed: int = 0,
    batch_size: int = 8,
    max_text_len: int = 32,
    device=None,
    progress: bool = True,
    desc: str = "generate",
) -> dict:
    """The generation loop shared by every model kind: batches of captions -> `render(emb, mask,
    generator) -> (wav [b, C, N], {stage: seconds})` -> WAVs + samples.jsonl. Returns the summed
    stage times and real-time factors (< 1: faster than real time)."""

    out_dir = Path(out_dir)  # checked by the callers before any loading (ttm.runs.generate)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    times: dict[str, float] = {}
    bar = progress_bar(total=len(prompts), desc=desc, leave=False, file=sys.stderr, disable=not progress)
    cut: list[bool] = []
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0 : b0 + batch_size]
        flags: list[bool] = []
        emb, mask = encode_captions(encoder, [p["caption"] for p in chunk], max_text_len, device, truncated=flags)
        wav, t = render(emb, mask, torch.Generator().manual_seed(seed + b0))
        for k, v in t.items():
            times[k] = times.get(k, 0.0) + v
        rows += write_clips(out_dir, chunk, wav.cpu(), codec.sample_rate, b0, seed + b0, flags)
        cut += flags
        bar.update(len(chunk))
    bar.close()
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if any(cut):
        first = next(p["caption"] for p, c in zip(prompts, cut) if c)
        print(f"warning: {sum(cut)} caption(s) had more than text.max_length={max_text_len} tokens and were cut "
              f"(e.g. {first[:60]!r}...); marked caption_truncated in samples.jsonl", file=sys.stderr)
    audio_s = max(len(prompts) * n_frames / codec.frame_rate, 1e-9)
    return {
        "n_clips": len(prompts),
        "captions_truncated": sum(cut),
        "seconds_per_clip": n_frames / codec.frame_rate,
        **{f"{k}_time_s": v for k, v in times.items()},
        "rtf_lm": times.get("lm", 0.0) / audio_s,
        "rtf_total": sum(times.values()) / audio_s,
    }


LONG_CLIP_FRAMES = 1000  # frames per clip past which generation shows progress within a batch


def clip_frames(cfg: RunConfig, data, seconds: float | None = None) -> int:
    """The one clip-length rule, in codec frames: `seconds` (an explicit request), else
    generate.seconds, else the training crop (data.max_seconds), else the dataset's clip length."""
    s = (seconds or cfg.generate.seconds or cfg.data.max_seconds
         or data.splits["train"].codes.shape[-1] / data.codec.frame_rate)
    return max(1, int(round(s * data.codec.frame_rate)))


def generate_clips(
    lm,
    codec,
    encoder,
    prompts: list[dict],
    out_dir: Path,
    n_frames: int,
    gen: GenerateConfig,
    seed: int = 0,
    batch_size: int = 8,
    max_text_len: int = 32,
    progress: bool = True,
    render_codes: Callable | None = None,
    desc: str = "generate",
    compile_step: bool = False,
) -> dict:
    """Generate one clip of `n_frames` per prompt into `out_dir`: the LM samples codes as `gen`
    says (cfg_scale, top_k, top_p, temperature), then `render_codes(codes, emb, mask, generator)
    -> (wav [b, C, N], {stage: seconds})` makes audio of them (default: the codec decodes them;
    a two-stage model passes its diffusion stage); `compile_step`: the LM decodes through
    `Backbone.compiled_step` (torch.compile). Returns timings, which decoding step ran and
    what ran its products per batch size in rows (`fused_cpu.rows_note`)."""

    def decode(codes, emb, mask, g):
        t0 = time.perf_counter()
        if codes.shape[1] < codec.n_codebooks:  # first_k models: decode from the codebooks they model
            wav = _decode_partial(codec, codes)
        else:
            wav = codec.decode(codes.cpu())  # [b, C, N]
        return wav, {"decode": time.perf_counter() - t0}

    def render(emb, mask, g):
        t0 = time.perf_counter()
        inner = None  # a progress line within each batch once clips are long (> LONG_CLIP_FRAMES)
        if progress and n_frames > LONG_CLIP_FRAMES:
            inner = progress_bar(total=lm.pattern.seq_len(n_frames), desc=f"{desc}: frames", unit="frame",
                                 leave=False, file=sys.stderr)
        codes = lm.generate(emb, mask, n_frames, cfg_scale=gen.cfg_scale, top_k=gen.top_k, top_p=gen.top_p,
                            temperature=gen.temperature, generator=g, compile_step=compile_step,
                            on_step=None if inner is None else (lambda s: inner.update(1)))  # [b, K', T]
        if inner is not None:
            inner.close()
        lm_time = time.perf_counter() - t0
        wav, times = (render_codes or decode)(codes, emb, mask, g)
        return wav, {"lm": lm_time, **times}

    info = render_prompts(prompts, encoder, out_dir, codec, n_frames, render, seed, batch_size, max_text_len,
                          next(lm.parameters()).device, progress, desc)
    cfg = 2 if uses_cfg(gen.cfg_scale) else 1  # CFG doubles a batch's rows
    rows = {cfg * min(batch_size, len(prompts)), cfg * (len(prompts) % batch_size or batch_size)}  # full, last
    products = {f"{r} rows": "torch.compile" if compile_step else fused_cpu.rows_note(r, next(lm.parameters()))
                for r in sorted(rows)}
    return {**info, "decode_step": "compiled" if compile_step else "eager", "step_products": products}


def _decode_partial(codec, codes: torch.Tensor) -> torch.Tensor:
    """Decode codes of the first k codebooks only (the stage-1 bottleneck), if the codec can."""
    if hasattr(codec, "decode_first_k"):
        return codec.decode_first_k(codes.cpu())
    raise ValueError(
        f"the model predicts {codes.shape[1]} of {codec.n_codebooks} codebooks and the codec "
        f"{type(codec).__name__} cannot decode a partial stack: use a two-stage model to render audio"
    )


def prompts_from_split(data, split: str, n: int | None) -> list[dict]:
    if split not in data.splits:
        raise ValueError(f"split {split!r} not in the dataset (have {sorted(data.splits)})")
    sp = data.splits[split]
    n = len(sp) if n is None else min(n, len(sp))  # None: the whole split
    return [{"caption": sp.captions[i], "attributes": sp.attributes[i], "id": sp.ids[i] if sp.ids else None}
            for i in range(n)]
