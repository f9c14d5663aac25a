"""Reading PyTorch checkpoints (TorchScript archives, torch.save'd state dicts, safetensors, Hugging Face
folders) into flat dicts of numpy arrays, and writing the original repo's format back. torch is
imported inside the functions: it is the optional `[torch]` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np

from cma_jax.convert.tables import TOKENIZER_FILES
from cma_jax.errors import CheckpointError
from cma_jax.files import write_atomic


def _torch():
    """The torch module, or one clear message naming the extra that installs it."""
    try:
        import torch  # optional dependency: only conversion needs it
    except ModuleNotFoundError:
        raise CheckpointError("reading or writing PyTorch checkpoints needs torch: pip install 'cma_jax[torch]'") from None
    return torch


def _as_numpy(sd) -> dict[str, np.ndarray]:
    """torch tensors -> float32 numpy (OpenAI archives are float16); non-float buffers kept as is."""
    torch = _torch()

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            v = v.float().numpy() if v.is_floating_point() else v.numpy()
        elif isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32)
        out[k] = v
    return out


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A TorchScript archive (OpenAI's `.pt`) or a `torch.save`d state dict."""
    torch = _torch()

    try:  # OpenAI's released checkpoints are TorchScript archives
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; these files still need it
            warnings.simplefilter("ignore", DeprecationWarning)
            return _as_numpy(torch.jit.load(path, map_location="cpu").state_dict())
    except RuntimeError:
        pass
    try:
        # The original repo's training checkpoints also pickle its argparse args (plain values).
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path}: cannot read it as a PyTorch checkpoint (expected a TorchScript archive "
                              f"such as OpenAI's .pt, or a torch.save'd state dict of tensors): {_reason(e)}") from e
    for wrapper in ("model", "state_dict"):  # {'model': sd, 'optimizer': ..., 'epoch': ..., 'args': ...}
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: expected a state dict (str -> tensor), got {type(sd).__name__}")
    return _as_numpy(sd)


def _reason(e: Exception) -> str:
    """torch's own first line, unless it is advice this tool must not follow (unpickling arbitrary code)."""
    text = str(e).strip()
    if "weights_only" in text:  # "re-run with weights_only=False ... arbitrary code execution"
        return "it holds Python objects other than tensors, which are never unpickled here for safety"
    first = (text.splitlines() or [""])[0]
    if not first or isinstance(e, (IndexError, KeyError, EOFError)):  # e.g. 'pop from empty list' on junk
        return "not a zip or pickle file torch can read (corrupt, truncated, or another kind of file)"
    return first


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    _torch()
    from safetensors.torch import load_file  # needs torch, as above

    return _as_numpy(load_file(path))


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict | None, list[str]]:
    """Read a file or HF folder -> (flat state dict of numpy arrays, HF config or None, tokenizer files)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder (expected an OpenAI/CMA .pt/.pth file or a "
                              f"Hugging Face CLIPModel folder)")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tokenizer = [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    config_file = os.path.join(folder, "config.json")
    hf_config = None
    if os.path.isfile(config_file):
        with open(config_file) as f:
            hf_config = json.load(f)
    if not os.path.isdir(path):
        sd = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_file(path)
        return sd, hf_config, tokenizer
    if hf_config is None:
        raise CheckpointError(f"{path}: a checkpoint folder must be a Hugging Face CLIPModel folder with "
                              f"config.json; none found")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        sd = _read_safetensors(os.path.join(path, "model.safetensors"))
    elif os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_read_safetensors(os.path.join(path, shard)))
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        sd = _read_torch_file(os.path.join(path, "pytorch_model.bin"))
    else:
        raise CheckpointError(f"{path}: Hugging Face folder without weights (expected model.safetensors, "
                              f"model.safetensors.index.json or pytorch_model.bin)")
    return sd, hf_config, tokenizer



def save_torch(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A dict of numpy arrays saved with `torch.save` as torch tensors, atomically."""
    torch = _torch()
    data = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    write_atomic(path, lambda f: torch.save(data, f))
