"""PyTorch CLIP / Cross-Modal-Adapter checkpoints <-> our NNX parameter trees, in numpy.

  tables.py    the conversion as data: OpenAI / Hugging Face / original-repo names and layouts
  torch_io.py  reading PyTorch files and HF folders, writing the original repo's format (needs torch)
  mapping.py   state dicts of any supported format <-> our backbone / adapter pure dicts
  __main__.py  the CLI: `python -m cma_jax.convert import|export ...`

Storage of the results (read-only backbone folders, adapter folders) is `cma_jax.checkpoint`'s job.
"""

from cma_jax.convert.mapping import (Converted, convert_checkpoint, convert_state_dict, detect_format,
                                     export_adapters, hf_to_openai, infer_config, to_cma, to_openai)
from cma_jax.convert.tables import CMA_KEYS, cma_layout, openai_table
from cma_jax.convert.torch_io import read_checkpoint
from cma_jax.errors import CheckpointError

__all__ = ["CMA_KEYS", "CheckpointError", "Converted", "cma_layout", "convert_checkpoint", "convert_state_dict",
           "detect_format", "export_adapters", "hf_to_openai", "infer_config", "openai_table", "read_checkpoint",
           "to_cma", "to_openai"]
