"""The Hugging Face Hub, offline-first: fetch (and convert once) models, publish runs with a model card.

    from astrolom.interop.hub import from_pretrained
    model = from_pretrained("hf:Smith42/astroPT/models/fully_trained/0089M_params/030000_ckpt.pt")

A spec is `hf:OWNER/NAME[/PATH][@REVISION]`. Files come through `huggingface_hub.hf_hub_download`, so its cache
(`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`, layout `models--OWNER--NAME/{blobs,snapshots/<commit>,refs}`)
and `HF_HUB_OFFLINE=1` (read at each call: the cache only, never the network) apply. A PATH that is a reference
AstroPT checkpoint (`.pt`, any generation `astrolom.interop.reference` imports) is converted once into an astrolom
model directory (config.json + model.safetensors) kept beside the hub cache in `astrolom-converted/v1/<blob>`,
keyed by the file's content hash and the conversion's version, written as a new directory and renamed into place
(`layout.atomic_directory`); the second call finds it and does no work. Without a PATH (or with a PATH naming a
folder) the repository is taken to hold an astrolom model directory, as `push` writes it.

`astrolom.model.pretrained.from_pretrained` loads local directories only: the model layer cannot import this one
(dependencies point one way), so `hf:` specs go through this module's `from_pretrained`; on the command line
every `--model hf:...` is resolved here by `astrolom.cli`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from astrolom.eval.probes import ProbeResult, markdown_table
from astrolom.interop.reference import load_reference_checkpoint
from astrolom.layout import CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME
from astrolom.model import pretrained
from astrolom.model.astropt import AstroPT

CONVERTED_DIR = "astrolom-converted"
# bumped whenever an importer change alters what a conversion writes, so stale conversions are not reused
CONVERSION_VERSION = 1
CARD_NAME = "README.md"
_SPEC = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<path>[^@]+?))?/?(?:@(?P<rev>[\w./-]+))?")


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    filename: str | None  # None: the repository is an astrolom model directory
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HubSpec:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ValueError(f"{spec!r} is not a hub spec: expected hf:OWNER/NAME[/PATH][@REVISION]")
        path = m["path"]
        return cls(m["repo"], path if path and not path.endswith(CONFIG_NAME) else None, m["rev"])


def is_hub_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith("hf:")


def hub_cache_dir() -> Path:
    """The hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (read at each call)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=hub_cache_dir(), local_files_only=_offline()
            )
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"hf:{repo_id}/{filename}{'@' + revision if revision else ''} is not in the hub cache {hub_cache_dir()}"
            + (" and HF_HUB_OFFLINE is set" if _offline() else "")
            + f" ({err})"
        ) from err


def converted_dir() -> Path:
    """Where converted reference checkpoints are kept: `<hub cache>/astrolom-converted/v<CONVERSION_VERSION>/`."""
    return hub_cache_dir() / CONVERTED_DIR / f"v{CONVERSION_VERSION}"


def resolve(spec: str) -> Path:
    """A local astrolom model directory for a hub spec (downloading / converting only what the cache lacks)."""
    s = HubSpec.parse(spec)
    if s.filename is None or not s.filename.endswith((".pt", ".pth", ".bin", ".ckpt")):
        sub = f"{s.filename}/" if s.filename else ""
        _download(s.repo_id, sub + WEIGHTS_NAME, s.revision)
        return _download(s.repo_id, sub + CONFIG_NAME, s.revision).parent
    src = _download(s.repo_id, s.filename, s.revision)
    blob = Path(os.path.realpath(src)).name  # the cache's blob name: the file's content hash (etag)
    out = converted_dir() / blob
    if (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file():
        return out
    commit = src.parents[len(Path(s.filename).parts) - 1].name  # .../snapshots/<commit>/<filename>
    convert_file(src, out, source=f"hf:{s.repo_id}/{s.filename}", revision=commit)
    return out


def convert_file(src: Path, out: Path, *, source: str, revision: str | None = None) -> AstroPT:
    """Import a reference checkpoint file into the model directory `out` (written whole, then renamed)."""
    model = load_reference_checkpoint(src)
    data = {"converted_from": source, **({"revision": revision} if revision else {})}
    pretrained.save_pretrained(model, out, data=data)
    return model


def from_pretrained(spec: str | Path, **kwargs) -> AstroPT:
    """`astrolom.model.pretrained.from_pretrained` that also takes `hf:` specs (module docstring)."""
    return pretrained.from_pretrained(resolve(spec) if is_hub_spec(spec) else spec, **kwargs)


# --- publishing -------------------------------------------------------------------------------------------------


def _latest_metrics(run_dir: Path) -> dict[str, float]:
    """The latest value of every scalar in RUN/metrics.jsonl (validation losses appear on some rows only)."""
    path = run_dir / METRICS_NAME
    latest: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                latest.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))})
    return latest


def model_card(model_dir: Path, repo_id: str, metrics: dict[str, float], probes: Path | None = None) -> str:
    """README.md for the hub: YAML metadata, architecture, the data it trained on, its last training metrics and,
    given a probes.json (`astrolom probe`), the probe tables."""
    cfg = pretrained.read_config(model_dir)
    m = cfg["model"]
    with safe_open(str(model_dir / WEIGHTS_NAME), framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    rows = [
        ("layers", m["n_layer"]),
        ("width", m["n_embd"]),
        ("heads", m["n_head"]),
        ("context (tokens)", m["block_size"]),
        ("patch", f"{m['patch_size']} px x {m['n_chan']} bands"),
        ("tokeniser", m["tokeniser"]),
        ("tokens preset", m.get("tokens_preset", "astrolom")),
        ("modalities", ", ".join(m["modalities"])),
        ("parameters", f"{n_params:,}"),
    ]
    data = cfg.get("data") or {}
    lines = [
        "---",
        "library_name: astrolom",
        "tags: [astronomy, astropt, galaxies, self-supervised]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"An AstroPT model trained with astrolom {cfg.get('astrolom_version', '')}. Load it with",
        "",
        "```python",
        "from astrolom.interop.hub import from_pretrained",
        f'model = from_pretrained("hf:{repo_id}")',
        "```",
        "",
        "## Model",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Data",
        "",
        *([f"- `{k}`: `{json.dumps(v)}`" for k, v in sorted(data.items())] or ["(not recorded)"]),
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))]
    else:
        lines.append("(no metrics.jsonl in the run)")
    if probes is not None:
        lines += [
            "",
            "## Probes",
            "",
            f"From `{Path(probes).name}` (`astrolom probe`).",
            "",
            markdown_table(ProbeResult.load(probes)),
        ]
    return "\n".join(lines) + "\n"


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def push(
    run: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    message: str | None = None,
    probes: str | Path | None = None,
    api=None,
) -> str:
    """Upload a run's model (config.json, model.safetensors) and its model card to `repo_id` in one commit.

    `api` defaults to `huggingface_hub.HfApi()`; its `create_repo` and `create_commit` are the only calls made.
    Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd

    run = Path(run)
    model_dir = pretrained.resolve_model_dir(run)
    metrics = _latest_metrics(run if (run / METRICS_NAME).is_file() else model_dir.parent)
    card = model_card(model_dir, repo_id, metrics, Path(probes) if probes else None).encode()
    operations = [
        CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(model_dir / n)) for n in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    api = api or _api()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=message or f"astrolom push of {model_dir}"
    )
    return str(getattr(info, "commit_url", info))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="RUN directory (its final/ model) or a model directory")
    parser.add_argument("repo", help="hub repository OWNER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--message", help="commit message")
    parser.add_argument("--probes", metavar="PROBES_JSON", help="probes.json of `astrolom probe`, shown in the card")


def run(args: argparse.Namespace) -> int:
    url = push(args.run, args.repo, private=args.private, message=args.message, probes=args.probes)
    print(f"pushed {args.run} -> {args.repo}: {url}")
    return 0
