"""FP8 training in DeepSeek-V3's fine-grained recipe (DESIGN.md §5).

`fp8_dot(x, w)` runs a linear layer's forward and both backward GEMMs in FP8
with 1 x 128 activation tiles and 128 x 128 weight blocks; `quant` holds the
quantizers (and the per-tensor / per-channel baselines). A weight that is
already FP8 (a published checkpoint loaded with keep_fp8=True) is passed as
`Quantized(q, scale)` and used as is; `published` dequantises such blocks on the
host when a checkpoint is loaded as float weights.
"""

from deepseek_jax.fp8.dot import BACKENDS, fp8_dot, fp8_grouped_dot
from deepseek_jax.fp8.published import block_scale_shape, dequantize_fp8_blocks
from deepseek_jax.fp8.quant import (FORMATS, Quantized, dequantize_blocks, dequantize_tiles,
                                    dequantize_weight, quantize_blocks, quantize_channels,
                                    quantize_tensor, quantize_tiles)

__all__ = ["BACKENDS", "FORMATS", "Quantized", "block_scale_shape", "dequantize_blocks",
           "dequantize_fp8_blocks", "dequantize_tiles", "dequantize_weight", "fp8_dot",
           "fp8_grouped_dot", "quantize_blocks", "quantize_channels", "quantize_tensor",
           "quantize_tiles"]
