"""Finding a rare class with labels from the person at the screen (`astrolom.search.labels`), against peers.

Start from 5 marked positives of a class (default `has_star`: a contaminating star in the stamp), answer labels from
the index's truth column, and count how many of the class are in the top 100 of the ranking of the unmarked objects
after 0, 1 and 3 rounds of 10 labels:

- `random order`: 100 random unmarked objects; each round labels 10 random ones (the base rate);
- `similarity to the 5 positives`: plain similarity search (cosine to the nearest positive), no rounds;
- `classifier, label the suggestions`: what the explorer does: `rank`, the person labels its 10 suggestions
  (uncertainty sampling), rank again;
- `classifier, label the top 10`: the same classifier, the person labels its 10 best instead.

Each row is the mean (and standard deviation) over `--repeats` draws of the 5 starting positives.

    python benchmarks/discovery.py --work /tmp/discovery            # survey 2000 x 32 px, 1500 debug steps, index
    python benchmarks/discovery.py --index IDX --label has_star     # an existing index with a truth column
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROUNDS = (0, 1, 3)
TOP = 100
PER_ROUND = 10
START = 5


def build(work: Path, n: int, size: int, steps: int) -> Path:
    """Mock survey -> short `debug` pretrain (8 px patches) -> `astrolom index --model` (no map); returns IDX."""
    run = [sys.executable, "-m", "astrolom"]
    survey, model, idx = work / "survey", work / "run", work / "index"
    if not survey.exists():
        subprocess.run(
            [
                *run,
                "survey",
                "--n",
                str(n),
                "--size",
                str(size),
                "--seed",
                "3",
                "--out",
                str(survey),
                "--workers",
                "1",
                "--no-progress",
            ],
            check=True,
        )
    if not model.exists():
        subprocess.run(
            [
                *run,
                "pretrain",
                "--data",
                str(survey),
                "--preset",
                "debug",
                "--out",
                str(model),
                "--max-steps",
                str(steps),
                "train.progress=false",
                "data.patch_size=8",
            ],
            check=True,
        )
    if not (idx / "meta.json").exists():
        subprocess.run(
            [
                *run,
                "index",
                "--model",
                str(model),
                "--data",
                str(survey),
                "--out",
                str(idx),
                "--map",
                "none",
                "--no-progress",
            ],
            check=True,
        )
    return idx


def session(index, truth: np.ndarray, start: np.ndarray, strategy: str, rng) -> list[int]:
    """Class members in the top TOP of the ranking after each of ROUNDS rounds of PER_ROUND labels."""
    from astrolom.search.labels import rank

    marks = {str(index.object_id[r]): 1 for r in start}
    hits = []
    for rnd in range(max(ROUNDS) + 1):
        free = np.setdiff1d(np.arange(len(index)), [index.row_of(i) for i in marks])
        if strategy == "random":
            top = rng.permutation(free)[:TOP]
            ask = rng.permutation(free)[:PER_ROUND]
        else:
            r = rank(index, marks, TOP, PER_ROUND)
            top = r.rows
            ask = r.suggest_rows if strategy == "suggest" else r.rows[:PER_ROUND]
        if rnd in ROUNDS:
            hits.append(int(truth[top].sum()))
        for row in ask:
            marks[str(index.object_id[row])] = int(truth[row])
    return hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default=None, help="an index with the truth column (default: build one in --work)")
    ap.add_argument("--work", default="/tmp/astrolom-discovery", help="where to build the survey, model and index")
    ap.add_argument("--n", type=int, default=2000, help="survey size when building")
    ap.add_argument("--size", type=int, default=32, help="stamp size when building")
    ap.add_argument("--steps", type=int, default=1500, help="debug pretraining steps when building")
    ap.add_argument("--label", default="has_star", help="truth column of the class to find (non-zero = member)")
    ap.add_argument("--repeats", type=int, default=5, help="draws of the 5 starting positives")
    args = ap.parse_args()

    from astrolom.search.index import load_index

    idx_dir = Path(args.index) if args.index else build(Path(args.work), args.n, args.size, args.steps)
    index = load_index(idx_dir)
    truth = np.nan_to_num(index.label_values(args.label).astype(float)) > 0
    members = np.flatnonzero(truth)
    print(
        f"index {idx_dir}: {len(index)} objects, {index.dim}-d; class {args.label}: {len(members)} members "
        f"({truth.mean():.1%}); top {TOP}, rounds of {PER_ROUND} labels, {args.repeats} draws of "
        f"{START} starting positives\n"
    )
    rows = {
        "random order": "random",
        f"similarity to the {START} positives": "similarity",
        "classifier, label the suggestions": "suggest",
        "classifier, label the top 10": "top",
    }
    results = {name: [] for name in rows}
    for rep in range(args.repeats):
        rng = np.random.default_rng(rep)
        start = rng.choice(members, START, replace=False)
        for name, strategy in rows.items():
            if strategy == "similarity":
                h = session(index, truth, start, "top", np.random.default_rng(rep))[0]
                results[name].append([h] * len(ROUNDS))
            else:
                results[name].append(session(index, truth, start, strategy, np.random.default_rng(rep)))
    head = " | ".join(f"after {r} round{'s' if r != 1 else ''}" for r in ROUNDS)
    print(f"| class members in the top {TOP} | {head} |")
    print("|---" * (len(ROUNDS) + 1) + "|")
    for name, res in results.items():
        a = np.array(res, dtype=float)
        cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(a.mean(0), a.std(0), strict=True))
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
