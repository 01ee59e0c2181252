"""gqalab's data pipeline: corpora -> sentencepiece BPE -> packed token files -> batches.

Kept light on purpose (no datasets/torch import): use the submodules,
data.prepare.prepare_data, data.tokenizer.Tokenizer, data.loader.TokenStream.
"""

from data.config import DataConfig, DataError

__all__ = ["DataConfig", "DataError"]
