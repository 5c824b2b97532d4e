"""Build the fortune-topic classification set shipped in this folder.

Source: Debian's `fortunes` package (1:1.99.1-7.3), fortune cookies filed by topic in
/usr/share/games/fortunes/*.u8 (`apt-get install fortunes`). Each cookie becomes one JSONL
record {"text", "label", "task"}; the label is the file (topic) it was filed under.

    python data/fortunes/make_dataset.py [--src /usr/share/games/fortunes] [--out data/fortunes]

Deterministic: the same source files give byte-identical train/val/test files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
from pathlib import Path

TOPICS = ["computers", "politics", "science", "songs-poems"]
PER_TOPIC = 500          # cap so every class has the same weight and the default run stays a few minutes
MIN_CHARS, MAX_CHARS = 20, 320
SPLIT = (0.7, 0.15, 0.15)
SEED = 0


def read_cookies(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    cookies = []
    for chunk in raw.split("\n%\n"):
        text = re.sub(r"\s+", " ", chunk.strip().strip("%")).strip()
        if MIN_CHARS <= len(text) <= MAX_CHARS:
            cookies.append(text)
    return cookies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="/usr/share/games/fortunes")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    rng = random.Random(SEED)
    for topic in TOPICS:
        f = src / f"{topic}.u8"
        if not f.exists():
            raise SystemExit(f"error: {f} not found; install it with `apt-get install fortunes` or pass --src")
        cookies = []
        for c in read_cookies(f):
            key = c.lower()
            if key not in seen:  # a cookie filed under two topics would leak across splits and labels
                seen.add(key)
                cookies.append(c)
        rng.shuffle(cookies)
        cookies = cookies[:PER_TOPIC]
        n_tr, n_va = int(SPLIT[0] * len(cookies)), int(SPLIT[1] * len(cookies))
        parts = {"train": cookies[:n_tr], "val": cookies[n_tr:n_tr + n_va], "test": cookies[n_tr + n_va:]}
        for name, items in parts.items():
            splits[name] += [{"text": t, "label": topic, "task": "fortune-topic"} for t in items]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        tmp = out / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out / f"{name}.jsonl")
        digest = hashlib.sha256((out / f"{name}.jsonl").read_bytes()).hexdigest()[:16]
        counts = {t: sum(r["label"] == t for r in rows) for t in TOPICS}
        print(f"{name}: {len(rows)} examples {counts} sha256[:16]={digest}")


if __name__ == "__main__":
    main()
