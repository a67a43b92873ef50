"""BERT-family encoders: MosaicBERT and classic BERT are two configurations of one class.

``model.py`` (config, encoder, MLM head, Composer model), ``hf_adapter.py`` (Hugging Face checkpoints),
``builder.py`` (the ``mosaic_bert`` and ``bert`` recipe entries; importing this package registers them).
"""

from llmfoundry_lite.models.bert.builder import build_bert, build_bert_mlm, build_mosaic_bert
from llmfoundry_lite.models.bert.hf_adapter import load_hf_bert
from llmfoundry_lite.models.bert.model import (
    CLASSIC,
    BertConfig,
    BertEmbeddings,
    BertEncoder,
    BertLayer,
    BertMLM,
    MLMHead,
    MLMOutput,
    pad_vocab,
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
