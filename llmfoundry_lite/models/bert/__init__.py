"""BERT-family encoders: MosaicBERT and classic BERT are two configurations of one class.

``config.py`` (BertConfig: the recipe schema), ``model.py`` (encoder, MLM head, Composer model), ``hf_adapter.py`` (Hugging Face checkpoints),
``builder.py`` (the ``mosaic_bert`` and ``bert`` recipe entries; importing this package registers them).
"""

from llmfoundry_lite.models.bert.builder import build_bert, build_bert_mlm, build_mosaic_bert
from llmfoundry_lite.models.bert.config import CLASSIC, BertConfig, pad_vocab
from llmfoundry_lite.models.bert.hf_adapter import load_hf_bert
from llmfoundry_lite.models.bert.model import (
    BertEmbeddings,
    BertEncoder,
    BertLayer,
    BertMLM,
    MLMHead,
    MLMOutput,
)

__all__ = [
    "CLASSIC",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertLayer",
    "BertMLM",
    "MLMHead",
    "MLMOutput",
    "build_bert",
    "build_bert_mlm",
    "build_mosaic_bert",
    "load_hf_bert",
    "pad_vocab",
]
