"""DeepSeek-V3 model: `Transformer(cfg).apply(variables, tokens)` -> logits
(also the dense GQA decoders, cfg.attention = "gqa": model/gqa.py).

`model.stages` is its training forward in pipeline-stage pieces (embedding,
a slice of the blocks, head + MTP), the functions a pipeline runs."""

from deepseek_jax.model.transformer import (Transformer, abstract_variables,
                                            check_inputs, count_active_params,
                                            count_params, init_variables)

__all__ = ["Transformer", "init_variables", "abstract_variables", "count_params",
           "count_active_params", "check_inputs"]
