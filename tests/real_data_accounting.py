"""Row accounting on a real-looking dialogue file (a measurement script, not a test).

    .venv/bin/python tests/real_data_accounting.py --rows 240     # the test fixture's size
    .venv/bin/python tests/real_data_accounting.py --rows 5000    # the larger file

Writes the file in all three TRL formats (gzipped JSON lines), trains the two tokenizers on it, then prints, per
format: what loading skipped (per reason, first rows), what the length rule cuts or drops with both tokenizers
under the defaults and with on_too_long=skip, and how many implicit-prompt rows TRL's common-prefix rule would
have split inside the reply (beyond the replies' shared leading space).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import real_data_helpers as helpers

from selpo_core.config import DataConfig
from selpo_core.data import check_lengths, load_preference_data


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    items = helpers.dialogues(args.rows, seed=args.seed)
    start = time.perf_counter()
    corpus = helpers.corpus(items)
    tokenizers = {"bytelevel": helpers.bytelevel_tokenizer(corpus), "metaspace": helpers.metaspace_tokenizer(corpus)}
    print(f"{args.rows} dialogues; tokenizers trained in {time.perf_counter() - start:.1f} s "
          f"(vocab {len(tokenizers['bytelevel'])} / {len(tokenizers['metaspace'])})")
    for fmt in ("standard", "conversational", "implicit"):
        path = helpers.write_rows(root / f"{fmt}.jsonl.gz", helpers.rows(items, fmt))
        cfg = DataConfig(path=str(path), on_bad_row="skip")
        examples, loaded = load_preference_data(cfg)
        print(f"\n[{fmt}] load: {loaded.summary()}")
        for on_too_long in ("truncate", "skip"):
            start = time.perf_counter()
            kept, lengths = check_lengths(examples, tokenizers, dataclasses.replace(cfg, on_too_long=on_too_long))
            seconds = time.perf_counter() - start
            merged = loaded.merge(lengths)
            print(f"[{fmt}] on_too_long={on_too_long} ({seconds:.1f} s, both tokenizers): {lengths.summary()}")
            print(f"[{fmt}]   manifest: {merged.metrics()}")
        if fmt == "implicit":
            moved = sum(common_prefix(r["chosen"], r["rejected"]) > len(r["chosen"]) - len(e.chosen) + 1
                        for r, e in zip(helpers.rows([items[e.row] for e in examples], fmt), examples))
            print(f"[implicit] rows whose raw common prefix runs into the replies (TRL's split would move a shared "
                  f"reply start into the prompt, or lose a prefix reply): {moved} of {len(examples)}")


if __name__ == "__main__":
    main()
