"""Loads a HF safetensors checkpoint into a (possibly sharded) model, tensor by tensor, so each
rank reads only the slices it holds."""

from __future__ import annotations

import glob
import os

from safetensors import safe_open
from torch import nn


def load_weights(model: nn.Module, path: str, progress: bool = False) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tie_source = getattr(model, "tie", False) and getattr(model, "is_last", False)
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="Loading weights", unit="file")
    for f in it:
        with safe_open(f, "pt", "cpu") as fh:
            for name in fh.keys():
                targets = []
                mapped = model.checkpoint_param_name(name)
                if mapped is not None:
                    targets.append(mapped)
                # tied LM head: the last stage reads the embedding matrix as its head
                if tie_source and name in ("model.embed_tokens.weight", "embed_tokens.weight"):
                    targets.append(("lm_head.weight", None))
                for ours, shard in targets:
                    if ours not in params:
                        continue
                    p = params[ours]
                    t = fh.get_tensor(name).to(p.dtype)
                    loader = getattr(p, "weight_loader", None)
                    if loader is None:
                        p.data.copy_(t)
                    elif shard is None:
                        loader(p, t)
                    else:
                        loader(p, t, shard)
                    loaded.add(ours)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {missing[:8]}{'...' if len(missing) > 8 else ''}")
