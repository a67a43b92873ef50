"""LLaMA-style decoders.

``model.py`` (config, layers, decoder, Composer model), ``hf_adapter.py`` (Hugging Face conversion both ways),
``builder.py`` (the ``llama`` recipe entry). Importing this package registers the family (its spec, last line).
"""

from llmfoundry_lite.models.llama.builder import build_llama, build_llama_model
from llmfoundry_lite.models.llama.hf_adapter import (
    config_from_hf,
    hf_config_dict,
    load_hf_llama,
    rope_permutation,
    state_dict_from_hf,
    state_dict_to_hf,
)
from llmfoundry_lite.models.llama.model import (
    Attention,
    ComposerLlama,
    LlamaBlock,
    LlamaConfig,
    LlamaDecoder,
    LlamaOutput,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    shifted_targets,
)
from llmfoundry_lite.models.spec import FamilySpec, register_family

LLAMA = register_family(
    FamilySpec(
        name="llama",
        objective="causal_lm",
        builders={"llama": build_llama},
        blocks=(LlamaBlock,),
        config_cls=LlamaConfig,
        hf_import=load_hf_llama,
        hf_export=state_dict_to_hf,
        hf_config=hf_config_dict,
        takes_sequence_id=True,
    )
)

__all__ = [
    "LLAMA",
    "Attention",
    "ComposerLlama",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaDecoder",
    "LlamaOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "build_llama",
    "build_llama_model",
    "config_from_hf",
    "hf_config_dict",
    "load_hf_llama",
    "rope_permutation",
    "shifted_targets",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
