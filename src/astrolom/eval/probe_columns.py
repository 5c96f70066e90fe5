"""Probe several embedding columns of one file on the same objects, so that their scores compare.

A multimodal model's embeddings carry one column per modality (`embedding_images`, `embedding_spectra`,
`embedding_joint`): `probe_columns` reads the chosen ones on the objects where all are present and probes each with
`astrolom.eval.probes.evaluate` -> {column: ProbeResult}; `columns_markdown` compares them target by target,
`best_column` names the winner, and `save_columns` / `load_columns` keep them in one JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from astrolom.eval.embeddings import EmbeddingTable, choose_columns, embedding_columns, load_embedding_columns
from astrolom.eval.probe_estimators import METHODS
from astrolom.eval.probes import DEFAULT_TARGETS, ProbeResult, evaluate


def evaluate_columns(
    tables: dict[str, EmbeddingTable],
    targets: list[str],
    methods: tuple[str, ...] = METHODS,
    fit_split: str = "val",
    test_split: str = "test",
    classify: tuple[str, ...] = (),
    seed: int = 0,
    progress=None,
) -> dict[str, ProbeResult]:
    """Probe each {column: table} (tables on the same rows, as `load_embedding_columns` gives) -> {column: result}.

    Each result's protocol names its `column`, every probed `columns` and the `rows` they share (all splits).
    """
    ids = [t.object_id for t in tables.values()]
    if any(len(i) != len(ids[0]) or not np.array_equal(i, ids[0]) for i in ids[1:]):
        raise ValueError("the embedding columns must be on the same objects in the same order")
    out = {}
    for column, table in tables.items():
        if progress:
            progress(f"probing column {column} ({table.X.shape[1]} features, {len(table)} objects)")
        result = evaluate(table, targets, methods, fit_split, test_split, classify=classify, seed=seed)
        result.protocol.update(column=column, columns=list(tables), rows=len(table))
        out[column] = result
    return out


def probe_columns(
    embeddings: str | Path,
    columns: str | list[str] = "auto",
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    methods: tuple[str, ...] = METHODS,
    fit_split: str = "val",
    test_split: str = "test",
    classify: tuple[str, ...] = (),
    seed: int = 0,
    progress=None,
) -> dict[str, ProbeResult]:
    """Probe every chosen embedding column of a file on the same objects (those where every chosen column is
    present), so that their scores compare. `columns`: "auto" (every `embedding_*` column, or `embedding` when it
    is the only one) or names. Returns {column: ProbeResult}; the pretrained feature set is the column."""
    chosen = choose_columns(embedding_columns(embeddings), columns)
    tables = load_embedding_columns(embeddings, chosen)
    return evaluate_columns(tables, list(targets), methods, fit_split, test_split, classify, seed, progress)


def best_column(results: dict[str, ProbeResult], target: str, method: str = "linear") -> str | None:
    """The column with the highest headline score (R2 or accuracy) for `target` (on a tie the first in order); None
    where none scored it."""
    scored = [(r.score(target, "pretrained", method), c) for c, r in results.items()]
    scored = [(v, c) for v, c in scored if v is not None]
    return max(scored, key=lambda vc: vc[0])[1] if scored else None


def column_targets(results: dict[str, ProbeResult]) -> list[str]:
    """Targets scored for any column, in probing order."""
    seen: dict[str, None] = {}
    for r in results.values():
        seen.update(dict.fromkeys(r.targets))
    return list(seen)


def columns_markdown(results: dict[str, ProbeResult], method: str = "linear") -> str:
    """Markdown: targets x columns (R2 or accuracy of `method`'s probe), the best column per target in bold."""
    cols = list(results)
    first = next(iter(results.values()))
    pr = first.protocol
    lines = [
        f"{method.capitalize()} probes of {len(cols)} embedding columns on the same {pr.get('rows', pr['n_fit'])} "
        f"objects (those with every column): fit on `{pr['fit_split']}` ({pr['n_fit']} objects), scored on "
        f"`{pr['test_split']}` ({pr['n_test']}). Cells: R2 for continuous targets, accuracy for classes "
        "(majority-class accuracy in brackets); bold: the best column.",
        "",
        "| target | metric | " + " | ".join(cols) + " | best |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for target in column_targets(results):
        ref = next(r for r in results.values() if target in r.targets)
        chance = ref.majority_accuracy(target)
        label = ref.metric(target) + ("" if chance is None else f" ({chance:.2f})")
        best = best_column(results, target, method)
        cells = []
        for c in cols:
            v = results[c].score(target, "pretrained", method)
            cell = "-" if v is None else f"{v:.3f}"
            cells.append(f"**{cell}**" if c == best else cell)
        lines.append(f"| {target} | {label} | " + " | ".join(cells) + f" | {best or '-'} |")
    return "\n".join(lines + [""])


def save_columns(results: dict[str, ProbeResult], path: str | Path) -> Path:
    """One JSON file {column: probe result} (each as in probes.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({c: r.to_dict() for c, r in results.items()}, indent=2))
    return path


def load_columns(path: str | Path) -> dict[str, ProbeResult]:
    """Read what `save_columns` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no per-column probe results at {path}")
    d = json.loads(path.read_text())
    return {c: ProbeResult.from_dict(r, f"{path} [{c}]") for c, r in d.items()}
