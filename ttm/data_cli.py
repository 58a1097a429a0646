"""`ttm-bench data {build,import,tokenize} ...`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttm.data.build import build_dataset
from ttm.data.importer import import_manifest


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttm-bench data", description="build, import and tokenize datasets")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="render a captioned dataset from the music21 corpus")
    b.add_argument("--preset", required=True, choices=("tiny", "small", "default"),
                   help="tiny ~48 clips x 4 s, small ~300 x 5 s, default ~960 x 6 s")
    b.add_argument("--out", required=True, type=Path, help="output folder (audio/, manifest.jsonl, card.json, card.md)")
    b.add_argument("--seed", type=int, default=0, help="seed of the choices (default 0); same seed, same dataset")
    b.add_argument("--workers", type=int, default=2, help="processes that parse uncached corpus files (default 2)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("import", help="import (audio path, caption) pairs from a JSONL file")
    i.add_argument("manifest", type=Path, help="JSONL with at least 'path' and 'caption' per line")
    i.add_argument("--out", required=True, type=Path, help="output folder (audio/, manifest.jsonl, import_report.json)")
    i.add_argument("--min-seconds", type=float, default=1.0, help="skip shorter audio (default 1.0)")
    i.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip longer audio (default 30, the study's clip length; cut long files into clips)")
    i.add_argument("--sample-rate", type=int, default=16000, help="resample to this rate (default 16000)")
    i.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("tokenize", help="encode a dataset into codec token shards (see its own --help)", add_help=False)
    return ap


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "tokenize":  # the codec CLI owns its arguments; imported when used
        from ttm.codecs.cli import tokenize_main

        return int(tokenize_main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.cmd == "build":
        man = build_dataset(args.preset, args.out, seed=args.seed, progress=not args.quiet, workers=args.workers)
        card = json.loads((man.parent / "card.json").read_text())
        print(f"{man}: {card['clips']} clips, {card['hours']:.3f} h "
              f"(train {card['splits']['train']['clips']}, valid {card['splits']['valid']['clips']}, "
              f"test {card['splits']['test']['clips']})")
        return 0
    if args.cmd == "import":
        man = import_manifest(args.manifest, args.out, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                              sample_rate=args.sample_rate, progress=not args.quiet)
        rep = json.loads((man.parent / "import_report.json").read_text())
        print(f"{man}: {rep['kept']} imported, {rep['skipped']} skipped (see {man.parent / 'import_report.json'})")
        return 0
    raise AssertionError(args.cmd)
