"""The built-in registry entries without their modules: names and one-line descriptions (``llmfoundry-lite list``)
and each entry's constructor arguments with types and defaults (checking a recipe: ``registry.entry_spec``).

The live registries are filled by importing the modules that define the entries, and those import torch and
Composer (seconds); listing names and checking a recipe's keys need none of it. GENERATED: after adding, renaming,
re-documenting or changing the arguments of a built-in entry, run `python scripts/registry_index.py`
(tests/test_cli.py and tests/test_fast_validate.py fail until you do). Data only: the generator lives in
``registry_listing.py`` (``builtin_index``, ``builtin_signatures``, ``render_index``).
"""

from __future__ import annotations

from typing import Any

BUILTINS: dict[str, dict[str, str]] = {
    "models": {
        "bert": "Classic BERT (learned positions, GELU MLP, LayerNorm) on the same encoder class; loads HF weights.",
        "hf_bert": "Hugging Face BertForMaskedLM built from a BertConfig (the MosaicBERT paper's baseline).",
        "hf_causal_lm": "Any Hugging Face causal LM (model_type llama, gpt2, ...) built from config kwargs, as a baseline.",
        "llama": "LLaMA-style decoder (RMSNorm, SwiGLU, RoPE, GQA); `init_from_hf` starts from a HF Llama checkpoint.",
        "mosaic_bert": "MosaicBERT encoder for MLM: ALiBi, GeGLU, low-precision LayerNorm, unpadding, masked-only head.",
    },
    "tokenizers": {
        "hf": "A Hugging Face tokenizer by hub name or local folder (AutoTokenizer).",
    },
    "dataloaders": {
        "finetune": "Instruction/chat examples from `data convert --finetune` (MDS): loss on responses only, packed or padded.",
        "text": "MDS shards (raw text or token rows) -> batches via StreamingDataset; collator mlm/causal_lm (auto).",
    },
    "collators": {
        "causal_lm": "Causal-LM batches: labels = input ids (padding IGNORE_INDEX), optional per-document sequence_id.",
        "finetune": "Finetuning batches (data convert --finetune): padded, labels only on responses, sequence_id when packed.",
        "mlm": "Masked-LM batches (BERT 80/10/10); tokenizes raw text on the fly; max_seq_len comes from the loader.",
    },
    "optimizers": {
        "adam": "Implements Adam algorithm.",
        "adamw": "Implements AdamW algorithm, where weight decay does not accumulate in the momentum nor variance.",
        "decoupled_adamw": "Adam with weight decay decoupled from the learning rate: Composer's DecoupledAdamW, updated by torch's fused kernel.",
        "decoupled_sgdw": "SGD optimizer with the weight decay term decoupled from the learning rate.",
        "sgd": "Implements stochastic gradient descent (optionally with momentum).",
    },
    "schedulers": {
        "constant": "Maintains a fixed learning rate.",
        "constant_with_warmup": "Maintains a fixed learning rate, with an initial warmup.",
        "cosine_decay": "Decays the learning rate according to the decreasing part of a cosine curve.",
        "cosine_warm_restarts": "Cyclically decays the learning rate according to the decreasing part of a cosine curve.",
        "cosine_with_warmup": "Decays the learning rate according to the decreasing part of a cosine curve, with an initial warmup.",
        "exponential": "Decays the learning rate exponentially.",
        "linear_decay": "Adjusts the learning rate linearly.",
        "linear_decay_with_warmup": "Adjusts the learning rate linearly, with an initial warmup.",
        "multistep": "Decays the learning rate discretely at fixed milestones.",
        "multistep_with_warmup": "Decays the learning rate discretely at fixed milestones, with an initial warmup.",
        "polynomial": "Sets the learning rate to be proportional to a power of the fraction of training time left.",
        "polynomial_with_warmup": "Decays the learning rate according to a power of the fraction of training time left, with an initial warmup.",
        "step": "Decays the learning rate discretely at fixed intervals.",
    },
    "algorithms": {
        "alibi": "ALiBi (Attention with Linear Biases; `Press et al, 2021  <https://arxiv.org/abs/2108.12409>`_) dispenses with",
        "ema": "Maintains a set of weights that follow the exponential moving average of the training model weights.",
        "gated_linear_units": "Replaces all instances of Linear layers in the feed-forward subnetwork with a `Gated Linear Unit <https://arxiv.org/abs/2002.05202>`_.",
        "gradient_clipping": "Clips all gradients in model based on specified clipping_type.",
        "label_smoothing": "Shrink targets towards a uniform distribution as in `Szegedy et al <https://arxiv.org/abs/1512.00567>`_.",
        "layer_freezing": "Progressively freeze the layers of the network during training, starting with the earlier layers.",
        "low_precision_layernorm": "Replaces all instances of :class:`torch.nn.LayerNorm` with class:`.LPLayerNorm`.",
        "sam": "Adds sharpness-aware minimization (`Foret et al, 2020 <https://arxiv.org/abs/2010.01412>`_)",
        "seq_length_warmup": "Progressively increases the sequence length during training.",
        "stochastic_depth": "Applies Stochastic Depth (`Huang et al, 2016 <https://arxiv.org/abs/1603.09382>`_) to the specified model.",
        "swa": "Applies Stochastic Weight Averaging (`Izmailov et al, 2018 <https://arxiv.org/abs/1803.05407>`_).",
    },
    "callbacks": {
        "activation_monitor": "Logs stats of activation inputs and outputs.",
        "cost_monitor": "Logs MFU, tokens/s, GPU-hours, dollars so far and projected total dollars to every logger.",
        "early_stopper": "Track a metric and halt training if it does not improve within a given interval.",
        "generate": "Sample text from prompts every `interval` and log it to the console and loggers.",
        "lm_eval": "Score lm-evaluation-harness tasks every `interval` and log eval/<task>/<metric> to every logger.",
        "lr_monitor": "Logs the learning rate.",
        "memory_monitor": "Logs the memory usage of the model.",
        "nan_monitor": "Catches NaNs in the loss and raises an error if one is found.",
        "optimizer_monitor": "Computes and logs the L2 norm of gradients as well as any optimizer-specific metrics implemented in the optimizer's `report_per_parameter_metrics` method.",
        "runtime_estimator": "Estimates total training time.",
        "smoe_schedule": "Sets SMoE-Dropout's k each batch from ``model.ffn``'s schedule; logs it; evaluates at ``eval_k``.",
        "speed_monitor": "Logs the training throughput and utilization.",
        "stream_counts": "Logs samples and tokens seen per stream of a mixture (``data/<stream>/samples``, ``.../tokens``).",
        "system_metrics_monitor": "Logs GPU/CPU metrics.",
        "threshold_stopper": "Halt training when a metric value reaches a certain threshold.",
    },
    "loggers": {
        "file": "Log data to a file.",
        "inmemory": "Logs metrics to dictionary objects that persist in memory throughout training.",
        "jsonl_metrics": "Append every logged metric to a JSON-lines file (rank 0); sweeps read trials' results from it.",
        "mlflow": "Log to `MLflow <https://www.mlflow.org/docs/latest/index.html>`_.",
        "tensorboard": "Log to `Tensorboard <https://www.tensorflow.org/tensorboard/>`_.",
        "wandb": "Weights & Biases logger (Composer's); the resolved recipe becomes the run config.",
    },
    "metrics": {
        "cross_entropy": "Torchmetrics cross entropy loss implementation.",
        "language_cross_entropy": "Torchmetric that computes cross entropy on language modeling outputs.",
        "language_perplexity": "Subclasses :class:`~composer.metrics.nlp.LanguageCrossEntropy` to implement perplexity.",
        "loss": "Turns a torch.nn Loss Module into distributed torchmetrics Metric.",
        "masked_accuracy": "Computes accuracy with support for masked indices.",
    },
}

# fmt: off
SIGNATURES: dict[str, dict[str, dict[str, Any]]] = {
    "models": {
        "bert": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('d_model', 'int', 768),
                ('n_layers', 'int', 12),
                ('n_heads', 'int', 12),
                ('intermediate_size', 'int', 3072),
                ('max_position_embeddings', 'int', 512),
                ('type_vocab_size', 'int', 2),
                ('position', "Literal['alibi', 'learned']", 'learned'),
                ('ffn', "Union[Literal['geglu', 'mlp'], llmfoundry_lite.models.ffn_config:FFNConfig]", 'mlp'),
                ('norm', "Literal['layernorm', 'low_precision_layernorm', 'fused_layernorm']", 'layernorm'),
                ('unpad', 'bool', True),
                ('attention_dropout', 'float', 0.1),
                ('hidden_dropout', 'float', 0.1),
                ('layer_norm_eps', 'float', 1e-12),
                ('init_std', 'float', 0.02),
                ('attn_impl', "Literal['auto', 'flash', 'sdpa']", 'auto'),
                ('use_train_metrics', 'bool', False),
                ('vocab_size', 'Union[int, None]', None),
                ('vocab_multiple', 'int', 64),
                ('init_from_hf', 'Union[str, None]', None),
            ],
        },
        "hf_bert": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('d_model', 'int', 768),
                ('n_layers', 'int', 12),
                ('n_heads', 'int', 12),
                ('intermediate_size', 'int', 3072),
                ('max_position_embeddings', 'int', 512),
                ('attention_dropout', 'float', 0.1),
                ('hidden_dropout', 'float', 0.1),
                ('layer_norm_eps', 'float', 1e-12),
                ('init_std', 'float', 0.02),
                ('vocab_size', 'Union[int, None]', None),
                ('attn_implementation', "Literal['sdpa', 'eager']", 'sdpa'),
                ('config_overrides', 'Union[dict, None]', None),
                ('init_from_hf', 'Union[str, None]', None),
            ],
        },
        "hf_causal_lm": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('model_type', 'str', 'llama'),
                ('config', 'Union[dict, None]', None),
                ('vocab_size', 'Union[int, None]', None),
                ('attn_implementation', "Literal['sdpa', 'eager']", 'sdpa'),
                ('init_from_hf', 'Union[str, None]', None),
            ],
        },
        "llama": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('d_model', 'int', 768),
                ('n_layers', 'int', 12),
                ('n_heads', 'int', 12),
                ('n_kv_heads', 'Union[int, None]', None),
                ('head_size', 'Union[int, None]', None),
                ('ffn_hidden_size', 'Union[int, None]', None),
                ('multiple_of', 'int', 256),
                ('ffn_dim_multiplier', 'Union[float, None]', None),
                ('norm_eps', 'float', 1e-05),
                ('rope_theta', 'float', 10000.0),
                ('rope_scaling', 'Union[dict, None]', None),
                ('max_seq_len', 'int', 2048),
                ('tie_embeddings', 'bool', False),
                ('init_std', 'float', 0.02),
                ('attn_impl', "Literal['auto', 'flash', 'sdpa']", 'auto'),
                ('use_train_metrics', 'bool', False),
                ('ffn', 'llmfoundry_lite.models.ffn_config:FFNConfig', Ellipsis),
                ('vocab_size', 'Union[int, None]', None),
                ('init_from_hf', 'Union[str, None]', None),
                ('init_device', "Literal['cpu', 'meta']", 'cpu'),
            ],
        },
        "mosaic_bert": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('d_model', 'int', 768),
                ('n_layers', 'int', 12),
                ('n_heads', 'int', 12),
                ('intermediate_size', 'int', 3072),
                ('max_position_embeddings', 'int', 512),
                ('type_vocab_size', 'int', 2),
                ('position', "Literal['alibi', 'learned']", 'alibi'),
                ('ffn', "Union[Literal['geglu', 'mlp'], llmfoundry_lite.models.ffn_config:FFNConfig]", 'geglu'),
                ('norm', "Literal['layernorm', 'low_precision_layernorm', 'fused_layernorm']", 'low_precision_layernorm'),
                ('unpad', 'bool', True),
                ('attention_dropout', 'float', 0.0),
                ('hidden_dropout', 'float', 0.1),
                ('layer_norm_eps', 'float', 1e-12),
                ('init_std', 'float', 0.02),
                ('attn_impl', "Literal['auto', 'flash', 'sdpa']", 'auto'),
                ('use_train_metrics', 'bool', False),
                ('vocab_size', 'Union[int, None]', None),
                ('vocab_multiple', 'int', 64),
                ('init_from_hf', 'Union[str, None]', None),
            ],
        },
    },
    "tokenizers": {
        "hf": {
            "var_kw": False, "nested": {}, "params": [
                ('path', 'str'),
                ('model_max_length', 'Union[int, None]', None),
                ('kwargs', 'Union[dict, None]', None),
            ],
        },
    },
    "dataloaders": {
        "finetune": {
            "var_kw": False, "nested": {'collator': 'collators'}, "params": [
                ('tokenizer', 'Any'),
                ('device_batch_size', 'int'),
                ('max_seq_len', 'int'),
                ('local', 'Union[str, None]', None),
                ('remote', 'Union[str, None]', None),
                ('split', 'Union[str, None]', None),
                ('collator', 'Union[dict, None]', None),
                ('shuffle', 'bool', False),
                ('shuffle_seed', 'int', 9176),
                ('epoch_size', 'Union[int, None]', None),
                ('num_workers', 'int', 0),
                ('drop_last', 'bool', True),
                ('pin_memory', 'bool', False),
                ('prefetch_factor', 'Union[int, None]', None),
                ('persistent_workers', 'bool', False),
                ('download_retry', 'int', 2),
                ('download_timeout', 'float', 60.0),
            ],
        },
        "text": {
            "var_kw": False, "nested": {'collator': 'collators'}, "params": [
                ('tokenizer', 'Any'),
                ('device_batch_size', 'int'),
                ('max_seq_len', 'int'),
                ('local', 'Union[str, None]', None),
                ('remote', 'Union[str, None]', None),
                ('split', 'Union[str, None]', None),
                ('streams', 'Union[dict, None]', None),
                ('collator', 'Union[dict, None]', None),
                ('shuffle', 'bool', False),
                ('shuffle_seed', 'int', 9176),
                ('shuffle_algo', 'str', 'py1e'),
                ('shuffle_block_size', 'Union[int, None]', None),
                ('num_canonical_nodes', 'Union[int, None]', None),
                ('predownload', 'Union[int, None]', None),
                ('cache_limit', 'Union[str, None]', None),
                ('download_retry', 'int', 2),
                ('download_timeout', 'float', 60.0),
                ('epoch_size', 'Union[int, None]', None),
                ('num_workers', 'int', 0),
                ('drop_last', 'bool', True),
                ('pin_memory', 'bool', False),
                ('prefetch_factor', 'Union[int, None]', None),
                ('persistent_workers', 'bool', False),
                ('timeout', 'float', 0.0),
            ],
        },
    },
    "collators": {
        "causal_lm": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('max_seq_len', 'Union[int, None]', None),
                ('sequence_id', 'bool', False),
                ('padding', "Literal['max_length', 'longest']", 'max_length'),
                ('append_eos', 'bool', True),
            ],
        },
        "finetune": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('max_seq_len', 'Union[int, None]', None),
                ('padding', "Literal['max_length', 'longest']", 'max_length'),
            ],
        },
        "mlm": {
            "var_kw": False, "nested": {}, "params": [
                ('tokenizer', 'Any', None),
                ('max_seq_len', 'Union[int, None]', None),
                ('mlm_probability', 'float', 0.15),
                ('padding', "Literal['max_length', 'longest']", 'max_length'),
            ],
        },
    },
    "optimizers": {
        "adam": {
            "var_kw": False, "nested": {}, "params": [
                ('params', 'Any'),
                ('lr', 'Any', 0.001),
                ('betas', 'tuple[Any, Any]', (0.9, 0.999)),
                ('eps', 'float', 1e-08),
                ('weight_decay', 'float', 0),
                ('amsgrad', 'bool', False),
                ('foreach', 'Union[bool, None]', None),
                ('maximize', 'bool', False),
                ('capturable', 'bool', False),
                ('differentiable', 'bool', False),
                ('fused', 'Union[bool, None]', None),
                ('decoupled_weight_decay', 'bool', False),
            ],
        },
        "adamw": {
            "var_kw": False, "nested": {}, "params": [
                ('params', 'Any'),
                ('lr', 'Any', 0.001),
                ('betas', 'tuple[Any, Any]', (0.9, 0.999)),
                ('eps', 'float', 1e-08),
                ('weight_decay', 'float', 0.01),
                ('amsgrad', 'bool', False),
                ('maximize', 'bool', False),
                ('foreach', 'Union[bool, None]', None),
                ('capturable', 'bool', False),
                ('differentiable', 'bool', False),
                ('fused', 'Union[bool, None]', None),
            ],
        },
        "decoupled_adamw": {
            "var_kw": False, "nested": {}, "params": [
                ('params', 'Any'),
                ('lr', 'float', 0.001),
                ('betas', 'tuple[float, float]', (0.9, 0.95)),
                ('eps', 'float', 1e-08),
                ('weight_decay', 'float', 1e-05),
                ('amsgrad', 'bool', False),
            ],
        },
        "decoupled_sgdw": {
            "var_kw": False, "nested": {}, "params": [
                ('params', 'Any'),
                ('lr', 'float', Ellipsis),
                ('momentum', 'float', 0),
                ('dampening', 'float', 0),
                ('weight_decay', 'float', 0),
                ('nesterov', 'bool', False),
            ],
        },
        "sgd": {
            "var_kw": False, "nested": {}, "params": [
                ('params', 'Any'),
                ('lr', 'Any', 0.001),
                ('momentum', 'float', 0),
                ('dampening', 'float', 0),
                ('weight_decay', 'Any', 0),
                ('nesterov', 'bool', False),
                ('maximize', 'bool', False),
                ('foreach', 'Union[bool, None]', None),
                ('differentiable', 'bool', False),
                ('fused', 'Union[bool, None]', None),
            ],
        },
    },
    "schedulers": {
        "constant": {
            "var_kw": False, "nested": {}, "params": [
                ('alpha', 'float', 1.0),
                ('t_max', 'Union[Duration, str]', '1dur'),
            ],
        },
        "constant_with_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('t_warmup', 'Union[Duration, str]'),
                ('alpha', 'float', 1.0),
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('scale_warmup', 'bool', False),
            ],
        },
        "cosine_decay": {
            "var_kw": False, "nested": {}, "params": [
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('alpha_f', 'float', 0.0),
            ],
        },
        "cosine_warm_restarts": {
            "var_kw": False, "nested": {}, "params": [
                ('t_0', 'Union[Duration, str]'),
                ('t_mult', 'float', 1.0),
                ('alpha_f', 'float', 0.0),
            ],
        },
        "cosine_with_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('t_warmup', 'Union[Duration, str]'),
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('alpha_f', 'float', 0.0),
                ('scale_warmup', 'bool', False),
            ],
        },
        "exponential": {
            "var_kw": False, "nested": {}, "params": [
                ('gamma', 'float'),
                ('decay_period', 'Union[Duration, str]', '1ep'),
            ],
        },
        "linear_decay": {
            "var_kw": False, "nested": {}, "params": [
                ('alpha_i', 'float', 1.0),
                ('alpha_f', 'float', 0.0),
                ('t_max', 'Union[Duration, str]', '1dur'),
            ],
        },
        "linear_decay_with_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('t_warmup', 'Union[Duration, str]'),
                ('alpha_i', 'float', 1.0),
                ('alpha_f', 'float', 0.0),
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('scale_warmup', 'bool', False),
            ],
        },
        "multistep": {
            "var_kw": False, "nested": {}, "params": [
                ('milestones', 'list[Union[Duration, str]]'),
                ('gamma', 'float', 0.1),
            ],
        },
        "multistep_with_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('t_warmup', 'Union[Duration, str]'),
                ('milestones', 'list[Union[Duration, str]]'),
                ('gamma', 'float', 0.1),
                ('scale_warmup', 'bool', False),
            ],
        },
        "polynomial": {
            "var_kw": False, "nested": {}, "params": [
                ('power', 'float'),
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('alpha_f', 'float', 0.0),
            ],
        },
        "polynomial_with_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('t_warmup', 'Union[Duration, str]'),
                ('power', 'float', 2.0),
                ('t_max', 'Union[Duration, str]', '1dur'),
                ('alpha_f', 'float', 0.0),
                ('scale_warmup', 'bool', False),
            ],
        },
        "step": {
            "var_kw": False, "nested": {}, "params": [
                ('step_size', 'Union[Duration, str]'),
                ('gamma', 'float', 0.1),
            ],
        },
    },
    "algorithms": {
        "alibi": {
            "var_kw": False, "nested": {}, "params": [
                ('max_sequence_length', 'int'),
                ('train_sequence_length_scaling', 'float', 0.25),
            ],
        },
        "ema": {
            "var_kw": False, "nested": {}, "params": [
                ('half_life', 'Union[str, None]', '1000ba'),
                ('smoothing', 'Union[float, None]', None),
                ('ema_start', 'str', '0.0dur'),
                ('update_interval', 'Union[str, None]', None),
            ],
        },
        "gated_linear_units": {
            "var_kw": False, "nested": {}, "params": [
                ('act_fn', 'Any', None),
                ('gated_layer_bias', 'bool', False),
                ('non_gated_layer_bias', 'bool', False),
            ],
        },
        "gradient_clipping": {
            "var_kw": False, "nested": {}, "params": [
                ('clipping_type', 'str'),
                ('clipping_threshold', 'float'),
            ],
        },
        "label_smoothing": {
            "var_kw": False, "nested": {}, "params": [
                ('smoothing', 'float', 0.1),
                ('target_key', 'Any', 1),
            ],
        },
        "layer_freezing": {
            "var_kw": False, "nested": {}, "params": [
                ('freeze_start', 'float', 0.5),
                ('freeze_level', 'float', 1.0),
            ],
        },
        "low_precision_layernorm": {
            "var_kw": False, "nested": {}, "params": [
                ('apply_at', 'Any', Ellipsis),
            ],
        },
        "sam": {
            "var_kw": False, "nested": {}, "params": [
                ('rho', 'float', 0.05),
                ('epsilon', 'float', 1e-12),
                ('interval', 'int', 1),
            ],
        },
        "seq_length_warmup": {
            "var_kw": False, "nested": {}, "params": [
                ('duration', 'float', 0.3),
                ('min_seq_length', 'int', 8),
                ('max_seq_length', 'int', 1024),
                ('step_size', 'int', 8),
                ('truncate', 'bool', True),
                ('preserve_end_of_sequence', 'bool', False),
            ],
        },
        "stochastic_depth": {
            "var_kw": False, "nested": {}, "params": [
                ('target_layer_name', 'str'),
                ('stochastic_method', 'str', 'block'),
                ('drop_rate', 'float', 0.2),
                ('drop_distribution', 'str', 'linear'),
                ('drop_warmup', 'Union[Duration, float, str]', 0.0),
            ],
        },
        "swa": {
            "var_kw": False, "nested": {}, "params": [
                ('swa_start', 'str', '0.7dur'),
                ('swa_end', 'str', '0.97dur'),
                ('update_interval', 'str', '1ep'),
                ('schedule_swa_lr', 'bool', False),
                ('anneal_strategy', 'str', 'linear'),
                ('anneal_steps', 'int', 10),
                ('swa_lr', 'Union[float, None]', None),
            ],
        },
    },
    "callbacks": {
        "activation_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('interval', 'Union[Duration, int, str]', '25ba'),
                ('ignore_module_types', 'Union[list[str], None]', None),
                ('only_log_wandb', 'bool', True),
            ],
        },
        "cost_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('gpu', 'Union[str, None]', None),
                ('usd_per_gpu_hour', 'Union[float, None]', None),
                ('peak_flops', 'Union[float, None]', None),
                ('window_size', 'int', 10),
                ('hardware', 'Union[dict, None]', None),
            ],
        },
        "early_stopper": {
            "var_kw": False, "nested": {}, "params": [
                ('monitor', 'str'),
                ('dataloader_label', 'str'),
                ('comp', 'Any', None),
                ('min_delta', 'float', 0.0),
                ('patience', 'Union[Duration, int, str]', 1),
            ],
        },
        "generate": {
            "var_kw": False, "nested": {}, "params": [
                ('prompts', 'list[str]'),
                ('interval', 'str', '1000ba'),
                ('max_new_tokens', 'int', 32),
                ('temperature', 'float', 1.0),
                ('top_k', 'Union[int, None]', 50),
                ('seed', 'int', 17),
                ('at_end', 'bool', True),
            ],
        },
        "lm_eval": {
            "var_kw": False, "nested": {}, "params": [
                ('tasks', 'list[str]'),
                ('interval', 'str', '1000ba'),
                ('limit', 'Union[int, None]', None),
                ('num_fewshot', 'Union[int, None]', None),
                ('include_path', 'Union[str, None]', None),
                ('batch_size', 'int', 8),
                ('at_end', 'bool', True),
            ],
        },
        "lr_monitor": {
            "var_kw": False, "nested": {}, "params": [
            ],
        },
        "memory_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('memory_keys', 'Union[dict, None]', None),
                ('dist_aggregate_batch_interval', 'Union[int, None]', None),
            ],
        },
        "nan_monitor": {
            "var_kw": True, "nested": {}, "params": [
            ],
        },
        "optimizer_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('log_optimizer_metrics', 'bool', True),
                ('batch_log_interval', 'int', 10),
            ],
        },
        "runtime_estimator": {
            "var_kw": False, "nested": {}, "params": [
                ('skip_batches', 'int', 1),
                ('time_unit', 'str', 'hours'),
            ],
        },
        "smoe_schedule": {
            "var_kw": False, "nested": {}, "params": [
            ],
        },
        "speed_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('window_size', 'int', 100),
                ('gpu_flops_available', 'Union[float, int, None]', None),
                ('time_unit', 'str', 'hours'),
            ],
        },
        "stream_counts": {
            "var_kw": False, "nested": {}, "params": [
            ],
        },
        "system_metrics_monitor": {
            "var_kw": False, "nested": {}, "params": [
                ('log_all_data', 'bool', False),
            ],
        },
        "threshold_stopper": {
            "var_kw": False, "nested": {}, "params": [
                ('monitor', 'str'),
                ('dataloader_label', 'str'),
                ('threshold', 'float'),
                ('comp', 'Any', None),
                ('stop_on_batch', 'bool', False),
            ],
        },
    },
    "loggers": {
        "file": {
            "var_kw": False, "nested": {}, "params": [
                ('filename', 'str', '{run_name}/logs-rank{rank}.txt'),
                ('remote_file_name', 'Union[str, None]', None),
                ('capture_stdout', 'bool', True),
                ('capture_stderr', 'bool', True),
                ('buffer_size', 'int', 1),
                ('log_traces', 'bool', True),
                ('flush_interval', 'int', 100),
                ('overwrite', 'bool', False),
            ],
        },
        "inmemory": {
            "var_kw": False, "nested": {}, "params": [
            ],
        },
        "jsonl_metrics": {
            "var_kw": False, "nested": {}, "params": [
                ('filename', 'str'),
                ('stop_on_nan', 'bool', False),
            ],
        },
        "mlflow": {
            "var_kw": False, "nested": {}, "params": [
                ('experiment_name', 'Union[str, None]', None),
                ('run_name', 'Union[str, None]', None),
                ('tags', 'Union[dict, None]', None),
                ('tracking_uri', 'Any', None),
                ('rank_zero_only', 'bool', True),
                ('flush_interval', 'int', 10),
                ('model_registry_prefix', 'str', ''),
                ('model_registry_uri', 'Union[str, None]', None),
                ('synchronous', 'bool', False),
                ('log_system_metrics', 'bool', True),
                ('rename_metrics', 'Union[dict, None]', None),
                ('ignore_metrics', 'Union[list[str], None]', None),
                ('ignore_hyperparameters', 'Union[list[str], None]', None),
                ('run_group', 'Union[str, None]', None),
                ('resume', 'bool', False),
                ('logging_buffer_seconds', 'Union[int, None]', 10),
                ('log_duplicated_metric_every_n_steps', 'int', 100),
            ],
        },
        "tensorboard": {
            "var_kw": False, "nested": {}, "params": [
                ('log_dir', 'Union[str, None]', None),
                ('flush_interval', 'int', 100),
                ('rank_zero_only', 'bool', True),
            ],
        },
        "wandb": {
            "var_kw": False, "nested": {}, "params": [
                ('project', 'Union[str, None]', None),
                ('group', 'Union[str, None]', None),
                ('name', 'Union[str, None]', None),
                ('entity', 'Union[str, None]', None),
                ('tags', 'Union[list[str], None]', None),
                ('log_artifacts', 'bool', False),
                ('rank_zero_only', 'bool', True),
                ('init_kwargs', 'Union[dict, None]', None),
            ],
        },
    },
    "metrics": {
        "cross_entropy": {
            "var_kw": False, "nested": {}, "params": [
                ('ignore_index', 'int', -100),
                ('dist_sync_on_step', 'bool', False),
            ],
        },
        "language_cross_entropy": {
            "var_kw": False, "nested": {}, "params": [
                ('dist_sync_on_step', 'bool', False),
                ('ignore_index', 'int', -100),
            ],
        },
        "language_perplexity": {
            "var_kw": False, "nested": {}, "params": [
                ('dist_sync_on_step', 'bool', False),
                ('ignore_index', 'int', -100),
            ],
        },
        "loss": {
            "var_kw": False, "nested": {}, "params": [
                ('loss_function', 'Any'),
                ('dist_sync_on_step', 'bool', False),
            ],
        },
        "masked_accuracy": {
            "var_kw": False, "nested": {}, "params": [
                ('ignore_index', 'int', -100),
                ('dist_sync_on_step', 'bool', False),
            ],
        },
    },
}
FAMILIES: dict[str, dict[str, Any]] = {
    "bert": {'name': 'bert', 'objective': 'mlm', 'takes_sequence_id': False},
    "hf_bert": {'name': 'hf_bert', 'objective': 'mlm', 'takes_sequence_id': False},
    "hf_causal_lm": {'name': 'hf_causal_lm', 'objective': 'causal_lm', 'takes_sequence_id': False},
    "llama": {'name': 'llama', 'objective': 'causal_lm', 'takes_sequence_id': True},
    "mosaic_bert": {'name': 'bert', 'objective': 'mlm', 'takes_sequence_id': False},
}
# fmt: on
