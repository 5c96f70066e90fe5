"""The Hub, offline: a local cache in huggingface_hub's documented layout, conversion once, and push against a stub.

The cache is built by hand the way the hub client lays it out (`models--OWNER--NAME/blobs/<sha256>`,
`snapshots/<commit>/<path>` symlinked to the blob, `refs/main` holding the commit), and HF_HUB_OFFLINE=1 is set, so
nothing here can reach the network. The reference checkpoint in it is written in the astropt 1.0.x layout by
`export_v1_checkpoint` (whose files astropt 1.0.4 itself loads with equal outputs: tests/test_reference_v1.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from astrolom.interop import convert, hub
from astrolom.interop.astropt_v1 import export_v1_checkpoint
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.model.pretrained import read_config, save_pretrained

REPO = "Smith42/astroPT"
FILE = "models/fully_trained/0001M_params/030000_ckpt.pt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _paper_model(seed: int = 0) -> AstroPT:
    torch.manual_seed(seed)
    return AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, patch_size=4, tokeniser="paper")).eval()


def _put(cache: Path, repo: str, path: str, data: bytes, commit: str = COMMIT, ref: str | None = "main") -> None:
    """Place a file in the cache exactly as hf_hub_download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    sha = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / sha).write_bytes(data)
    link = root / "snapshots" / commit / path
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_v1_checkpoint(_paper_model(), tmp_path / "ckpt.pt")
    _put(cache, REPO, FILE, (tmp_path / "ckpt.pt").read_bytes())
    return cache


def _same_weights(a: AstroPT, b: AstroPT) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_hub_checkpoint_is_converted_once_and_cached(cache, monkeypatch):
    calls = []
    real = hub.convert_file
    monkeypatch.setattr(hub, "convert_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = hub.from_pretrained(f"hf:{REPO}/{FILE}")
    _same_weights(_paper_model(), model)
    assert model.config.tokens_preset == "paper2024"
    assert len(calls) == 1
    (converted,) = hub.converted_dir().iterdir()
    assert converted.name == hashlib.sha256(Path(calls[0][0]).read_bytes()).hexdigest()  # keyed by the blob
    assert read_config(converted)["data"] == {"converted_from": f"hf:{REPO}/{FILE}", "revision": COMMIT}
    mtime = (converted / "model.safetensors").stat().st_mtime_ns

    again = hub.from_pretrained(f"hf:{REPO}/{FILE}@{COMMIT}")  # the same blob by commit: no new work
    _same_weights(model, again)
    assert len(calls) == 1
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in hub.converted_dir().iterdir()] == [converted.name]  # no temp dirs left
    assert hub.converted_dir() == cache / "astrolom-converted" / "v1"


def test_offline_miss_names_the_file_and_the_cache(cache):
    with pytest.raises(FileNotFoundError, match=r"0005M_params.*not in the hub cache.*HF_HUB_OFFLINE"):
        hub.resolve(f"hf:{REPO}/models/fully_trained/0005M_params/030000_ckpt.pt")
    with pytest.raises(ValueError, match="hf:OWNER/NAME"):
        hub.resolve("hf:no-repo-name")


def test_interrupted_conversion_leaves_no_model_and_is_redone(cache, monkeypatch):
    import astrolom.model.pretrained as pretrained

    def crash(*a, **k):
        raise KeyboardInterrupt  # the writer dies half way through the weights

    with monkeypatch.context() as m:
        m.setattr(pretrained, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            hub.resolve(f"hf:{REPO}/{FILE}")
    assert not hub.converted_dir().exists() or not any(hub.converted_dir().iterdir())
    _same_weights(_paper_model(), hub.from_pretrained(f"hf:{REPO}/{FILE}"))


def test_convert_cli_from_hub(cache, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    out = tmp_path / "m1"
    assert convert.run(parser.parse_args(["--from-hub", REPO, "--file", FILE, "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "astropt 1.0.x layout" in text and "paper2024" in text
    _same_weights(_paper_model(), hub.from_pretrained(out))
    assert convert.run(parser.parse_args(["--from-hub", REPO, "--file", FILE])) == 0  # cache only
    assert str(hub.converted_dir()) in capsys.readouterr().out
    assert convert.run(parser.parse_args(["--from-hub", REPO, "--file", FILE, "--revision", COMMIT])) == 0
    assert f"@{COMMIT} -> {hub.converted_dir()}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not in the hub cache"):
        convert.run(parser.parse_args(["--from-hub", REPO, "--file", FILE, "--revision", "v9"]))
    with pytest.raises(SystemExit, match="--file"):
        convert.run(parser.parse_args(["--from-hub", REPO]))


class _StubApi:
    """The two HfApi calls `push` makes, recorded; the commit's files are kept so a test can 'download' them."""

    def __init__(self):
        self.calls = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id, operations, commit_message):
        self.calls.append(("create_commit", repo_id, commit_message))
        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()


def _probe_result():
    """A real `astrolom probe` result (eval.probes.evaluate) on 80 objects whose redshift is linear in the features."""
    from astrolom.eval.embeddings import EmbeddingTable
    from astrolom.eval.probes import evaluate

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4)).astype(np.float32)
    z = 0.3 + 0.1 * X[:, 0] + 0.02 * rng.normal(size=80)
    table = EmbeddingTable(np.array([f"g{i}" for i in range(80)]), np.array(["val", "test"] * 40), X, {"redshift": z})
    return evaluate(table, ["redshift"], methods=("linear",))


def test_push_writes_a_model_card_and_uploads_one_commit(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, patch_size=4)).eval()
    save_pretrained(model, run / "final", data={"path": "survey/", "split_fractions": [0.8, 0.1, 0.1]})
    rows = [{"step": 100, "train_loss": 0.5}, {"step": 200, "train_loss": 0.25, "val_loss": 0.3125}, {"step": 300}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = _probe_result()
    probes.save(run / "probes.json")
    api = _StubApi()
    url = hub.push(run, "me/tiny", private=True, probes=run / "probes.json", api=api)
    assert url.endswith(COMMIT)
    assert api.calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert sorted(api.files) == ["README.md", "config.json", "model.safetensors"]
    card = api.files["README.md"].decode()
    assert "library_name: astrolom" in card
    assert "| layers | 2 |" in card and "| width | 16 |" in card
    assert f"| parameters | {model.num_params(non_embedding=False):,} |" in card
    assert "`split_fractions`: `[0.8, 0.1, 0.1]`" in card
    r2 = probes.score("redshift")
    assert "## Probes" in card and f"| redshift | r2 | {r2:.3f} |" in card and 0.5 < r2 < 1
    assert "| train_loss | 0.25 |" in card and "| val_loss | 0.3125 |" in card and "| step | 300 |" in card

    # what was pushed comes back through the hub cache as a native model (no conversion)
    cache = tmp_path / "hub"
    for name, data in api.files.items():
        _put(cache, "me/tiny", name, data)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _same_weights(model, hub.from_pretrained("hf:me/tiny"))
    assert not (cache / hub.CONVERTED_DIR).exists()  # a native model: nothing converted


def test_push_cli_help():
    from astrolom.cli import COMMANDS

    assert COMMANDS["push"][0] == "astrolom.interop.hub" and COMMANDS["convert"][0] == "astrolom.interop.convert"
    parser = argparse.ArgumentParser()
    hub.add_arguments(parser)
    args = parser.parse_args(["runs/x", "me/x", "--private"])
    assert (args.run, args.repo, args.private) == ("runs/x", "me/x", True)


def test_any_command_takes_a_hub_model(cache, tmp_path, capsys):
    from PIL import Image

    from astrolom.cli import main
    from astrolom.model.pretrained import from_pretrained

    with pytest.raises(FileNotFoundError, match="Hub spec"):
        from_pretrained(f"hf:{REPO}/{FILE}")  # the model layer does not download, and says where to go
    (tmp_path / "cutouts").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "cutouts" / f"g{i}.png")
    out = tmp_path / "emb.parquet"
    argv = ["embed", "--model", f"hf:{REPO}/{FILE}", "--data", str(tmp_path / "cutouts"), "--out", str(out)]
    assert main([*argv, "--no-progress", "--layer", "-1"]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 3 and len(table.column("embedding")[0]) == 16
