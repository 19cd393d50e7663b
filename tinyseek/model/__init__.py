"""DeepSeek-V3-style MoE transformer: MLA/GQA attention, fine-grained + shared experts."""
from tinyseek.model.transformer import Transformer, ModelOutput  # noqa: F401
from tinyseek.model.cache import KVCache  # noqa: F401
