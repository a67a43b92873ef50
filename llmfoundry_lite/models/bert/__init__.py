"""BERT-family encoders: MosaicBERT and classic BERT are two configurations of one class.

``models/configs.py`` (BertConfig: the recipe schema; torch-free), ``model.py`` (encoder, MLM head, Composer model), ``hf_adapter.py`` (Hugging Face checkpoints),
``builder.py`` (the ``mosaic_bert`` and ``bert`` recipe entries). Importing this package registers the family.
"""

from llmfoundry_lite.models.bert.builder import build_bert, build_bert_mlm, build_mosaic_bert
from llmfoundry_lite.models.bert.hf_adapter import load_hf_bert
from llmfoundry_lite.models.bert.model import (
    BertEmbeddings,
    BertEncoder,
    BertLayer,
    BertMLM,
    MLMHead,
    MLMOutput,
)
from llmfoundry_lite.models.configs import CLASSIC, BertConfig, pad_vocab
from llmfoundry_lite.models.spec import FamilySpec, register_family

BERT = register_family(
    FamilySpec(
        name="bert",
        objective="mlm",
        builders={"mosaic_bert": build_mosaic_bert, "bert": build_bert},
        blocks=(BertLayer,),
        config_cls=BertConfig,
        hf_import=load_hf_bert,
    )
)

__all__ = [
    "BERT",
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
