"""AstroCLIP-style cross-modal alignment: contrastive image-spectrum embeddings on frozen astrolom encoders.

Data flow: `features` (frozen encoders -> cached per-token features, with sky-respecting image augmentations) ->
`model` (cross-attention pooling head + MLP per modality) trained by `train` with the InfoNCE of `loss` ->
`evaluate` (retrieval, kNN / MLP property estimation, normalising-flow posteriors with TARP calibration).
"""
