"""Prepare (download, tokenize, pack) a dataset ahead of training and print its stats.

    python scripts/prepare_data.py                          # conf/data/shakespeare.yaml
    python scripts/prepare_data.py --config pydocs
    python scripts/prepare_data.py --source shakespeare tokenizer.vocab_size=8192

Extra ``key=value`` arguments override DataConfig fields, as on the train.py command
line after ``data.``. Useful on a login node with network before an offline job.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfx.core.errors import TfxError  # noqa: E402
from tfx.data import prepare_data  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a conf/data/*.yaml name (default: --source's, else shakespeare)")
    parser.add_argument("--source", help="shakespeare | pydocs | hub | files")
    parser.add_argument("overrides", nargs="*", help="DataConfig fields as key=value")
    args = parser.parse_args()
    name = args.config or (args.source if (CONF / f"{args.source}.yaml").exists() else "shakespeare")
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if args.source:
        cfg.source = args.source
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    try:
        data = prepare_data(cfg)
    except TfxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"cache: {data.cache_path}\ntokenizer: vocab {data.vocab_size}, eos {data.eos_id}, "
          f"dtype {data.dtype}")
    for split, blocks in (("train", data.train), ("val", data.val), ("test", data.test)):
        print(f"{split:>5}: {blocks.n_tokens:>11,} tokens  {len(blocks):>8,} blocks of {blocks.seq_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
