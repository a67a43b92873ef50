"""Names and one-line descriptions of the built-in registry entries, so `llmfoundry-lite list` starts in a blink.

The live registries are filled by importing the modules that define the entries, and those import torch and
Composer (4-10 s); listing names needs none of it. GENERATED: after adding, renaming or re-documenting a
built-in entry, run `python scripts/registry_index.py` (tests/test_cli.py fails until you do). Data only: the
generator lives in ``registry.py`` (``builtin_index``, ``render_index``), which imports this module.
"""

from __future__ import annotations

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
        "text": "MDS shards (raw text or token rows) -> batches via StreamingDataset; collator mlm/causal_lm (auto).",
    },
    "collators": {
        "causal_lm": "Causal-LM batches: labels = input ids (padding -100), optional per-document sequence_id.",
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
