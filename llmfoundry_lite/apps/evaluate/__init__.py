"""Zero/few-shot scoring of decoders on EleutherAI's lm-evaluation-harness: ``llmfoundry-lite eval``.

Modules: ``adapter`` (lm-eval ``LM`` over our decoders: batched log-likelihoods, rolling windows, greedy
generation), ``harness`` (checkpoint or HF folder -> lm-eval ``LM``, tasks, results, eval.json/eval.md),
``callback`` (the ``lm_eval`` training callback), ``cli`` (the verb). lm-eval is the optional extra ``.[eval]``:
importing this package imports neither it nor torch.
"""
