"""Checkpoint interop: Hugging Face DeepSeek-V3 safetensors <-> deepseek_jax."""

from deepseek_jax.interop.hf import (config_from_hf, config_to_hf,
                                     dequantize_fp8_blocks, load_hf_checkpoint,
                                     load_jax_variables, save_hf_checkpoint,
                                     save_jax_variables)

__all__ = ["config_from_hf", "config_to_hf", "dequantize_fp8_blocks",
           "load_hf_checkpoint", "save_hf_checkpoint", "load_jax_variables",
           "save_jax_variables"]
