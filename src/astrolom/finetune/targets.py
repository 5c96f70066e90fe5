"""What a fine-tuned head predicts, and the loss for each kind of target.

Three kinds of target, each a block of head outputs:

- **regression** (redshift, log_mstar, ...): one output, trained on the target standardised with the mean and
  standard deviation of the training labels (MSE, or Huber with delta=1 on the standardised scale); predictions are
  mapped back to the label's units.
- **classification** (telescope, edge_on, ...): one logit per class seen in the training labels, cross-entropy.
- **votes** (Galaxy-Zoo-like vote fractions: smooth, disc, spiral, ...): a *question* of the decision tree gets one
  output per answer, turned into Dirichlet concentrations alpha = 1 + 99 sigmoid(x), and the loss is the negative
  log-likelihood of the observed vote *counts* under a Dirichlet-multinomial (Walmsley et al. 2022, Zoobot). Unlike
  a regression on fractions it knows that 3 of 5 votes is weaker evidence than 24 of 40, and that a galaxy nobody
  was asked about (0 votes) carries no information. The prediction for an answer is its expected fraction
  alpha_k / sum(alpha).

Vote counts. The mock survey (`astrolom.mock`) stores fractions k / n of its simulated volunteers (their number is in
the data set's metadata, `vote_volunteers`: 40) along a fixed tree, so the counts are recovered exactly from the
fractions and the tree: smooth/disc/artefact are fractions of all volunteers; `edge_on_vote` of the `disc` voters;
`spiral` and `bar` of the face-on disc voters (disc minus edge-on). `vote_counts` rebuilds them and refuses fractions
that are not k / n. Data sets from elsewhere get the regression loss for their fraction columns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from astrolom.eval.probe_estimators import CLASSIFICATION, REGRESSION, target_kind

VOTES = "votes"
KINDS = (REGRESSION, CLASSIFICATION, VOTES)
REGRESSION_LOSSES = ("mse", "huber")
IGNORE = -100  # cross_entropy's ignore index: an object without this label

# The mock survey's Galaxy-Zoo-like decision tree: question -> answers. An answer is the label column holding its vote
# fraction; "<col>:no" is the complementary answer of a yes/no question (its fraction is 1 - <col>).
MOCK_QUESTIONS: dict[str, tuple[str, ...]] = {
    "smooth_or_featured": ("smooth", "disc", "artefact"),
    "edge_on": ("edge_on_vote", "edge_on_vote:no"),
    "spiral": ("spiral", "spiral:no"),
    "bar": ("bar", "bar:no"),
}
# label columns each question's voter count depends on
_COUNT_COLUMNS = {
    "smooth_or_featured": ("smooth", "disc", "artefact"),
    "edge_on": ("disc", "edge_on_vote"),
    "spiral": ("disc", "edge_on_vote", "spiral"),
    "bar": ("disc", "edge_on_vote", "bar"),
}


def question_of(target: str) -> str | None:
    """The mock tree's question whose answer `target` is, or None."""
    return next((q for q, answers in MOCK_QUESTIONS.items() if target in answers), None)


def count_columns(question: str) -> tuple[str, ...]:
    """Label columns needed to rebuild the vote counts of `question`."""
    return _COUNT_COLUMNS[question]


def _counts(frac: np.ndarray, n: np.ndarray, what: str) -> np.ndarray:
    k = frac * n
    bad = np.abs(k - np.rint(k)) > 1e-3 * np.maximum(n, 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what}: fraction {frac[i]:.6g} of {int(n[i])} voters is not a whole number of votes "
            f"({int(bad.sum())} objects); these are not the mock survey's vote fractions"
        )
    return np.rint(k).astype(np.int64)


def vote_counts(labels: dict[str, np.ndarray], question: str, voters: int) -> np.ndarray:
    """(N, K) vote counts of one mock-survey question, rebuilt exactly from its stored fractions (see module doc);
    `voters`: the volunteers asked the first question (the data set's `vote_volunteers`)."""
    missing = [c for c in count_columns(question) if c not in labels]
    if missing:
        raise ValueError(f"vote counts of {question!r} need the label column(s) {missing}")
    col = {c: np.asarray(labels[c], np.float64) for c in count_columns(question)}
    n = np.full(len(col["disc"]), float(voters))
    k_s = _counts(col["smooth"], n, "smooth") if "smooth" in col else None
    k_d = _counts(col["disc"], n, "disc")
    if question == "smooth_or_featured":
        k_a = _counts(col["artefact"], n, "artefact")
        return np.stack([k_s, k_d, k_a], axis=1)
    k_e = _counts(col["edge_on_vote"], k_d.astype(np.float64), "edge_on_vote")
    if question == "edge_on":
        return np.stack([k_e, k_d - k_e], axis=1)
    k_f = (k_d - k_e).astype(np.float64)
    k = _counts(col[question], k_f, question)
    return np.stack([k, k_f.astype(np.int64) - k], axis=1)


def dirichlet_multinomial_nll(alpha: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-object negative log-likelihood of vote counts (B, K) under DirMult(N, alpha (B, K)); 0 when N = 0."""
    n = counts.sum(-1)
    a0 = alpha.sum(-1)
    log_norm = torch.lgamma(n + 1) + torch.lgamma(a0) - torch.lgamma(n + a0)
    log_terms = torch.lgamma(counts + alpha) - torch.lgamma(alpha) - torch.lgamma(counts + 1)
    return -(log_norm + log_terms.sum(-1))


def concentrations(logits: torch.Tensor) -> torch.Tensor:
    """Head outputs -> Dirichlet concentrations in (1, 100), Zoobot's bounded parametrisation."""
    return 1.0 + 99.0 * torch.sigmoid(logits)


@dataclass
class TargetSpec:
    """One predicted quantity; `mean`/`std` (regression), `classes` (classification), `question` (votes)."""

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    classes: list[str] = field(default_factory=list)
    question: str | None = None


@dataclass
class _Group:
    """A block of head outputs trained by one loss: a regression target, a class target or a vote question."""

    key: str
    kind: str
    start: int
    size: int
    answers: tuple[str, ...] = ()


class Targets:
    """The head's output layout, the encoding of labels, the loss and the decoding of predictions."""

    def __init__(self, specs: list[TargetSpec], regression_loss: str = "mse", voters: int | None = None):
        if regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression loss must be one of {REGRESSION_LOSSES}, got {regression_loss!r}")
        self.specs = specs
        self.regression_loss = regression_loss
        self.voters = voters  # volunteers behind the vote fractions (vote targets only)
        self.groups: list[_Group] = []
        start = 0
        for s in specs:
            if s.kind == VOTES:
                if any(g.key == s.question for g in self.groups):
                    continue  # smooth and disc share the smooth_or_featured block
                answers = MOCK_QUESTIONS[s.question]
                self.groups.append(_Group(s.question, VOTES, start, len(answers), answers))
                start += len(answers)
            elif s.kind == CLASSIFICATION:
                self.groups.append(_Group(s.name, CLASSIFICATION, start, len(s.classes)))
                start += len(s.classes)
            else:
                self.groups.append(_Group(s.name, REGRESSION, start, 1))
                start += 1
        self.n_outputs = start

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> TargetSpec:
        return next(s for s in self.specs if s.name == name)

    def metric_kind(self, name: str) -> str:
        """How predictions are scored: vote fractions like a regression (R2), classes by accuracy."""
        return CLASSIFICATION if self.spec(name).kind == CLASSIFICATION else REGRESSION

    # ----------------------------------------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        names: list[str],
        labels: dict[str, np.ndarray],
        *,
        votes: bool = True,
        classify: tuple[str, ...] = (),
        regression_loss: str = "mse",
        voters: int | None = None,
        where: str = "the data",
    ) -> Targets:
        """Target specs from the training labels.

        Args:
            names: target label columns.
            labels: training labels {column: values}.
            votes: treat the mock tree's vote fractions as vote counts (Dirichlet-multinomial); else regression.
            classify: targets to treat as classes whatever their values look like.
            voters: volunteers behind the vote fractions (the data set's metadata `vote_volunteers`); needed for
                vote targets when `votes` is on.
            where: the data set, for error messages.
        """
        if not names:
            raise ValueError("no targets given")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target(s) {dupes} given more than once")
        unknown = [n for n in names if n not in labels]
        if unknown:
            cols = ", ".join(sorted(labels))
            raise ValueError(f"unknown target(s) {unknown}: {where} has no such label column (it has: {cols})")
        specs = []
        for name in names:
            values = np.asarray(labels[name])
            q = question_of(name) if votes else None
            if q is not None:
                if voters is None:
                    raise ValueError(
                        f"target {name!r} is a vote fraction, but {where} does not say how many volunteers voted "
                        "(no 'vote_volunteers' in its metadata), so its vote counts cannot be rebuilt: regenerate a "
                        "mock survey written before 2026-12-04 with `astrolom survey`, or regress the fractions "
                        "instead (--no-vote-counts)"
                    )
                vote_counts(labels, q, voters)  # validates the fractions (clear error if they are not k / n)
                specs.append(TargetSpec(name, VOTES, question=q))
                continue
            kind = CLASSIFICATION if name in classify else target_kind(_numeric_or_str(values))
            if kind == CLASSIFICATION:
                classes = sorted({str(v) for v in values if _present(v)})
                if len(classes) < 2:
                    raise ValueError(f"target {name!r} has a single class {classes} in the training labels of {where}")
                specs.append(TargetSpec(name, CLASSIFICATION, classes=classes))
            else:
                v = values.astype(np.float64)
                v = v[np.isfinite(v)]
                if v.size < 2:
                    raise ValueError(f"target {name!r} has fewer than 2 finite training labels in {where}")
                specs.append(TargetSpec(name, REGRESSION, mean=float(v.mean()), std=float(v.std()) or 1.0))
        return cls(specs, regression_loss, voters)

    def to_json(self) -> dict:
        return {
            "regression_loss": self.regression_loss,
            "voters": self.voters,
            "specs": [dataclasses.asdict(s) for s in self.specs],
        }

    @classmethod
    def from_json(cls, data: dict) -> Targets:
        return cls([TargetSpec(**s) for s in data["specs"]], data.get("regression_loss", "mse"), data.get("voters"))

    def label_columns(self) -> list[str]:
        """Every label column the encoding reads (targets plus the columns vote counts depend on)."""
        cols = []
        for s in self.specs:
            for c in (s.name, *(count_columns(s.question) if s.kind == VOTES else ())):
                if c not in cols:
                    cols.append(c)
        return cols

    # ---------------------------------------------------------------------------------------- labels and losses

    def encode(self, labels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Labels -> per-group training tensors (missing labels: NaN / IGNORE / zero votes)."""
        out = {}
        for g in self.groups:
            if g.kind == VOTES:
                out[g.key] = torch.as_tensor(vote_counts(labels, g.key, self.voters), dtype=torch.float32)
            elif g.kind == CLASSIFICATION:
                index = {c: i for i, c in enumerate(self.spec(g.key).classes)}
                codes = [index.get(str(v), IGNORE) if _present(v) else IGNORE for v in labels[g.key]]
                out[g.key] = torch.as_tensor(codes, dtype=torch.long)
            else:
                s = self.spec(g.key)
                v = np.asarray(labels[g.key], np.float64)
                out[g.key] = torch.as_tensor((v - s.mean) / s.std, dtype=torch.float32)
        return out

    def loss(self, out: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over groups of each group's mean loss over the objects that have its label; (total, parts)."""
        total = out.new_zeros((), dtype=torch.float32)
        parts = {}
        for g in self.groups:
            o, t = out[:, g.start : g.start + g.size].float(), y[g.key]
            if g.kind == VOTES:
                ok = t.sum(-1) > 0
                if not bool(ok.any()):
                    continue
                part = dirichlet_multinomial_nll(concentrations(o[ok]), t[ok]).mean()
            elif g.kind == CLASSIFICATION:
                if not bool((t != IGNORE).any()):
                    continue
                part = F.cross_entropy(o, t, ignore_index=IGNORE)
            else:
                ok = torch.isfinite(t)
                if not bool(ok.any()):
                    continue
                fn = F.mse_loss if self.regression_loss == "mse" else F.huber_loss
                part = fn(o[ok, 0], t[ok])
            total = total + part
            parts[g.key] = float(part.detach())
        return total, parts

    @torch.no_grad()
    def predict(self, out: torch.Tensor) -> dict[str, np.ndarray]:
        """Head outputs -> {target: predictions in the label's units / class names / expected vote fractions}."""
        out = out.float().cpu()
        preds = {}
        for s in self.specs:
            if s.kind == VOTES:
                g = next(g for g in self.groups if g.key == s.question)
                alpha = concentrations(out[:, g.start : g.start + g.size])
                frac = alpha / alpha.sum(-1, keepdim=True)
                preds[s.name] = frac[:, g.answers.index(s.name)].numpy().astype(np.float64)
            elif s.kind == CLASSIFICATION:
                g = next(g for g in self.groups if g.key == s.name)
                preds[s.name] = np.asarray(s.classes)[out[:, g.start : g.start + g.size].argmax(1).numpy()]
            else:
                g = next(g for g in self.groups if g.key == s.name)
                preds[s.name] = out[:, g.start].numpy().astype(np.float64) * s.std + s.mean
        return preds


def _present(v) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    return not (isinstance(v, str) and v == "")


def _numeric_or_str(values: np.ndarray) -> np.ndarray:
    """Values as target_kind expects them: float (NaN for missing) or str objects."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64) if values.dtype.kind != "b" else values
    try:
        return np.asarray([np.nan if not _present(v) else float(v) for v in values])
    except (TypeError, ValueError):
        return np.asarray(["" if not _present(v) else str(v) for v in values], dtype=object)
