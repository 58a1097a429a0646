"""Generation: `ttm-bench generate RUN (--prompt TEXT | --prompts FILE | --split test) --out DIR`.

Writes one WAV per caption and `samples.jsonl` rows `{file, caption, seed, attributes}`, plus
`ref_id` (the reference clip's manifest id) for split-driven prompts.
Sampling is recurrent (backbone state / KV cache, one step per token) with classifier-free
guidance as one batched pass of conditional + null captions.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ttm.audio import atomic_write_text, save_audio


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


def encode_captions(encoder, captions: list[str], max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text embeddings cut or padded to a fixed length: `[B, max_len, Dt]`, mask `[B, max_len]`
    (the LM's memory length is fixed; padding is masked and replaced by its null vector)."""
    emb, mask = encoder.encode(captions)
    emb, mask = emb[:, :max_len], mask[:, :max_len]
    pad = max_len - emb.shape[1]
    emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return emb.to(device), mask.to(device)


def write_clips(out_dir: Path, prompts: list[dict], wav: torch.Tensor, sample_rate: int, first_index: int,
                seed: int) -> list[dict]:
    """Save one WAV per prompt (`wav [b, C, N]`); returns their samples.jsonl rows."""
    rows = []
    for j, p in enumerate(prompts):
        name = f"{first_index + j:04d}-{_slug(p['caption'])}.wav"
        save_audio(Path(out_dir) / name, wav[j], sample_rate)
        rows.append({"file": name, "caption": p["caption"], "seed": seed, "index": j,
                     "attributes": p.get("attributes", {}),
                     **({"ref_id": p["id"]} if p.get("id") is not None else {})})  # eval pairs KL 1:1 by it
    return rows


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
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    times: dict[str, float] = {}
    bar = tqdm(total=len(prompts), desc=desc, leave=False, file=sys.stderr, disable=not progress)
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0 : b0 + batch_size]
        emb, mask = encode_captions(encoder, [p["caption"] for p in chunk], max_text_len, device)
        wav, t = render(emb, mask, torch.Generator().manual_seed(seed + b0))
        for k, v in t.items():
            times[k] = times.get(k, 0.0) + v
        rows += write_clips(out_dir, chunk, wav.cpu(), codec.sample_rate, b0, seed + b0)
        bar.update(len(chunk))
    bar.close()
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    audio_s = max(len(prompts) * n_frames / codec.frame_rate, 1e-9)
    return {
        "n_clips": len(prompts),
        "seconds_per_clip": n_frames / codec.frame_rate,
        **{f"{k}_time_s": v for k, v in times.items()},
        "rtf_lm": times.get("lm", 0.0) / audio_s,
        "rtf_total": sum(times.values()) / audio_s,
    }


def generate_clips(
    model,
    codec,
    encoder,
    prompts: list[dict],
    out_dir: Path,
    seconds: float,
    cfg_scale: float = 3.0,
    top_k: int = 50,
    top_p: float = 0.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_text_len: int = 32,
    progress: bool = True,
) -> dict:
    """Generate one clip per prompt with a single-stage LM into `out_dir`; returns timings."""
    n_frames = max(1, int(round(seconds * codec.frame_rate)))

    def render(emb, mask, g):
        t0 = time.perf_counter()
        codes = model.generate(emb, mask, n_frames, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                               temperature=temperature, generator=g)  # [b, K', T]
        t1 = time.perf_counter()
        if codes.shape[1] < codec.n_codebooks:  # first_k models: decode from the codebooks they model
            wav = _decode_partial(codec, codes)
        else:
            wav = codec.decode(codes.cpu())  # [b, C, N]
        return wav, {"lm": t1 - t0, "decode": time.perf_counter() - t1}

    return render_prompts(prompts, encoder, out_dir, codec, n_frames, render, seed, batch_size, max_text_len,
                          next(model.parameters()).device, progress)


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


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ttm-bench generate", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="trained run directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one caption")
    src.add_argument("--prompts", help="text file (one caption per line) or JSONL with 'caption'")
    src.add_argument("--split", help="captions of this dataset split (train/valid/test)")
    ap.add_argument("--n", type=int, default=8, help="clips from --split")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfg-scale", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="two-stage runs: diffusion sampling steps")
    ap.add_argument("--sampler", choices=["ddim", "ancestral"], default=None, help="two-stage runs: diffusion sampler")
    ap.add_argument("--diffusion-cfg-scale", type=float, default=None, help="two-stage runs: stage-2 guidance")
    a = ap.parse_args(argv)
    from ttm.two_stage import generate_cli, is_two_stage_run

    if is_two_stage_run(a.run):
        return generate_cli(a)
    from ttm.prepare import build_text_encoder_for
    from ttm.train import load_run

    cfg, model, data = load_run(Path(a.run), a.device)
    if a.prompt:
        prompts = [{"caption": a.prompt, "attributes": {}}]
    elif a.prompts:
        prompts = read_prompts(Path(a.prompts))
    else:
        prompts = prompts_from_split(data, a.split, a.n)
    g = cfg.generate
    seconds = a.seconds or g.seconds or cfg.data.max_seconds or data.splits["train"].codes.shape[-1] / data.codec.frame_rate
    info = generate_clips(
        model, data.codec, build_text_encoder_for(cfg), prompts, Path(a.out), seconds,
        cfg_scale=g.cfg_scale if a.cfg_scale is None else a.cfg_scale,
        top_k=g.top_k if a.top_k is None else a.top_k,
        top_p=g.top_p if a.top_p is None else a.top_p,
        temperature=g.temperature if a.temperature is None else a.temperature,
        seed=a.seed, batch_size=a.batch_size, max_text_len=cfg.text.max_length,
    )
    print(json.dumps(info))
    print(Path(a.out) / "samples.jsonl")
    return 0
