"""GLUE finetuning of a pretrained BERT encoder: ``llmfoundry-lite glue RECIPE``.

A GLUE recipe names the encoder (``model`` and ``tokenizer`` blocks, usually by ``base:`` on the pretraining
recipe) and has a ``glue:`` section naming the starting weights, the data and the tasks. For each task and seed a
fresh classification (or, for STS-B, regression) head goes on the encoder and Composer trains it; RTE, MRPC and
STS-B start from the MNLI-finetuned encoder (MosaicBERT's reference protocol). With several GPUs, jobs run in
parallel, one worker process per GPU.

Modules, in the order a run uses them: ``config`` (tasks, published settings, the ``glue:`` section, jobs),
``data`` (task files, tokenization, toy data), ``model`` (encoder + head, metrics, starting weights), ``job``
(one finetuning run), ``orchestrate`` (rounds, workers, ``run_glue``), ``results`` (scores, markdown),
``cli`` (the verb). Importing this package imports none of them.
"""
