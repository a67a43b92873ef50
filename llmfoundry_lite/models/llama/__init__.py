"""LLaMA-style decoders.

``model.py`` (config, layers, decoder, Composer model), ``hf_adapter.py`` (Hugging Face conversion both ways),
``builder.py`` (the ``llama`` recipe entry; importing this package registers it).
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

__all__ = [
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
