"""Checkpoint interop: Hugging Face safetensors <-> deepseek_jax.

Families: DeepSeek-V4 (arch="v4": mHC, compressed attention, hash routing),
DeepSeek-V3.2 (DeepSeek Sparse Attention), V3 / R1 and V2 (MLA + MoE), and the
dense decoders
LlamaForCausalLM (DeepSeek LLM, R1-Distill-Llama) and Qwen2ForCausalLM
(R1-Distill-Qwen) as attention="gqa" models.

The public API is this package's names; the modules split the work by job:

  hf_config.py       config.json <-> ModelConfig (V3.2, V3 and V2 families; dispatch)
  hf_dense.py        config.json <-> ModelConfig for Llama and Qwen2
  hf_v4.py           DeepSeek-V4: config.json <-> ModelConfig and its key map (own names)
  hf_keys.py         the key map: HF tensor names <-> our leaf paths (the 1:1 table)
  hf_check.py        an HF directory checked from its headers (check_hf_checkpoint)
  hf_load.py         streaming tensors into our variables, on the host or onto a mesh;
                     block-FP8 weights dequantised (fp8/published.py) or kept (keep_fp8)
  hf_save.py         our variables -> config.json + sharded safetensors + index
  jax_format.py      our own format: model_config.json + variables.safetensors
  variables.py       the leaves and dtypes a ModelConfig builds, checked by every format
  safetensors_io.py  the file level: shards, headers, raw float8 reads, flat keys
"""

from deepseek_jax.fp8.published import dequantize_fp8_blocks
from deepseek_jax.interop.hf_check import check_hf_checkpoint
from deepseek_jax.interop.hf_config import config_from_hf, config_to_hf, read_hf_config
from deepseek_jax.interop.hf_load import load_hf_checkpoint
from deepseek_jax.interop.hf_save import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
from deepseek_jax.interop.jax_format import load_jax_variables, save_jax_variables

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "check_hf_checkpoint", "config_from_hf", "config_to_hf",
           "dequantize_fp8_blocks", "load_hf_checkpoint", "load_jax_variables",
           "read_hf_config", "save_hf_checkpoint", "save_jax_variables"]
