"""Test oracle: the reference `astropt==1.0.4`, run in a subprocess (it cannot share a site-packages with 2.0.9).

Usage: python tests/oracle_astropt1.py ORACLE_DIR REQUEST.json OUT.pt. ORACLE_DIR (made by `scripts/setup.sh --dev`:
`pip install --no-deps --target .oracles/astropt-1.0.4 astropt==1.0.4`) goes first on sys.path, so `import astropt`
is 1.0.4. The request lists jobs; every result is a tensor, so the caller reads OUT.pt with weights_only=True.

Jobs:
    {"kind": "train_ckpt", "name", "model_args", "seed", "compiled", "path", "tokens"}: build the reference GPT with
        random (then perturbed) weights, save it as its scripts/train.py does, and report its outputs on `tokens`
        (a saved (B, T+1, D) tensor): predictions and loss for X = t[:, :-1], Y = t[:, 1:], get_embeddings(X).
    {"kind": "load", "name", "path", "tokens"}: load a checkpoint the way astropt 1.0.4's own `load_astropt`
        does (GPTConfig(**model_args), strip `_orig_mod.`, strict load) and report the same outputs.
    {"kind": "preprocess", "name", "pixels", "path"}: the (H, W, C) uint8 pixels in `pixels` (.npy) through the
        reference's training pipeline: `np.array(img).swapaxes(0, 2)`, `GalaxyImageDataset.process_galaxy` with the
        training script's `normalise` transform and spiral=True; and the embedding of the first 64 tokens by the
        model checkpoint at `path` (`generate_embeddings`, the mean of `get_embeddings`).
    {"kind": "shapes", "name", "model_args"}: the reference GPT built on the meta device (no memory): the shape of
        every state-dict entry and `get_num_params()`, for the paper's sizes up to 2.1B.
"""

from __future__ import annotations

import json
import sys
import types


def run_oracle(jobs: list[dict], workdir, oracle_dir) -> dict:
    """Run `jobs` in a subprocess with the 1.0.4 oracle first on sys.path; returns its results (tensors only)."""
    import os
    import subprocess
    from pathlib import Path

    import torch

    workdir = Path(workdir)
    (workdir / "request.json").write_text(json.dumps(jobs))
    out = workdir / "out.pt"
    cmd = [sys.executable, __file__, str(oracle_dir), str(workdir / "request.json"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"astropt 1.0.4 oracle failed:\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


def _reference_normalise(x):
    """astropt 1.0.4 scripts/train.py `normalise` with its default use_hf=True (the HF galaxies path), verbatim in
    behaviour; its `transforms.Compose([transforms.Lambda(normalise)])` applies exactly this one function."""
    import torch

    x = torch.from_numpy(x).to(torch.float32)
    std, mean = torch.std_mean(x, dim=1, keepdim=True)
    x_norm = (x - mean) / (std + 1e-8)
    return x_norm.to(torch.float16)


def _local_normalise(x):
    """The same script's `normalise` with use_hf=False (local JPEGs read by torchvision and cast to bfloat16)."""
    import torch

    std, mean = torch.std_mean(x, dim=1, keepdim=True)
    return ((x - mean) / (std + 1e-8)).to(torch.float16)


def _perturb(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _outputs(gpt, tokens) -> dict:
    import torch

    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        pred, loss = gpt(x, y)
        return {"pred": pred, "loss": loss, "emb": gpt.get_embeddings(x), "mean_emb": gpt.generate_embeddings(x)}


def _load(path):
    """What astropt 1.0.4's `load_astropt` does after `hf_hub_download`."""
    import torch
    from astropt.model import GPT, GPTConfig

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**checkpoint["model_args"]), master_process=False)
    state_dict = checkpoint["model"]
    for k in list(state_dict):
        if k.startswith("_orig_mod."):
            state_dict[k[len("_orig_mod.") :]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    return model.eval()


def main(oracle_dir: str, request: str, out: str) -> None:
    sys.path.insert(0, oracle_dir)
    # local_datasets imports torchvision.io (for read_image) at module level; torchvision does not import beside
    # this torch, and nothing below reads files through it, so an empty stand-in module satisfies the import
    sys.modules.setdefault("torchvision", types.SimpleNamespace(io=None))
    import astropt
    import numpy as np
    import torch
    from astropt.local_datasets import GalaxyImageDataset
    from astropt.model import GPT, GPTConfig

    assert astropt.__file__.startswith(oracle_dir), astropt.__file__
    results = {}
    for job in json.loads(open(request).read()):
        name = job["name"]
        if job["kind"] == "shapes":
            with torch.device("meta"):
                gpt = GPT(GPTConfig(**job["model_args"]), master_process=False)
            results.update({f"{name}/shape/{k}": torch.tensor(list(v.shape)) for k, v in gpt.state_dict().items()})
            results[f"{name}/num_params"] = torch.tensor(gpt.get_num_params())
            continue
        if job["kind"] == "train_ckpt":
            torch.manual_seed(job["seed"])
            gpt = GPT(GPTConfig(**job["model_args"]), master_process=False)
            _perturb(gpt, job["seed"] + 1)
            state = gpt.state_dict()
            if job.get("compiled"):
                state = {"_orig_mod." + k: v for k, v in state.items()}
            optimizer = gpt.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
            checkpoint = {  # what scripts/train.py saves
                "model": state,
                "optimizer": optimizer.state_dict(),
                "model_args": job["model_args"],
                "iter_num": 30000,
                "best_val_loss": torch.zeros(200).mean(),
                "config": {"batch_size": 8, "learning_rate": 6e-4, "spiral": True, "dtype": "bfloat16"},
            }
            torch.save(checkpoint, job["path"])
            gpt.eval()
        else:
            gpt = _load(job["path"])
        if job["kind"] in ("train_ckpt", "load"):
            tokens = torch.load(job["tokens"], weights_only=True)
            results.update({f"{name}/{k}": v for k, v in _outputs(gpt, tokens).items()})
        elif job["kind"] == "preprocess":
            pixels = np.load(job["pixels"])
            ds = GalaxyImageDataset(None, transform=_reference_normalise, spiral=True, patch_size=16)
            tokens = ds.process_galaxy(pixels.swapaxes(0, 2))  # scripts/train.py's process_galaxy_wrapper
            with torch.no_grad():
                emb = gpt.generate_embeddings(tokens[None, :64].to(torch.float32))
            # the local-file path: torchvision's read_image (C, H, W) uint8, cast to bfloat16 by __getitem__
            chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
            bf16 = chw.to(torch.bfloat16)
            local = GalaxyImageDataset(None, transform=_local_normalise, spiral=True, patch_size=16)
            results.update(
                {
                    f"{name}/tokens": tokens,
                    f"{name}/emb": emb,
                    f"{name}/bf16_exact": torch.tensor(bool(torch.equal(bf16.to(torch.float32), chw.float()))),
                    f"{name}/local_tokens": local.process_galaxy(bf16),
                }
            )
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
