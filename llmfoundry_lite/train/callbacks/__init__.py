"""What every run carries (progress line, train.log, metrics.jsonl, preemption, stop signals) and the callbacks
a recipe may add (``cost_monitor``, ``generate``), as Composer callbacks and logger destinations."""
