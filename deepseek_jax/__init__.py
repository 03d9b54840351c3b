"""deepseek_jax: DeepSeek-V3 / R1 model and training recipe in JAX + Flax."""

from deepseek_jax.config import ModelConfig, get_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "get_preset"]
