"""What a training run leaves behind, and what reads it back.

- ``summary``: the run summary (``mfu_summary.json`` and ``mfu_windows.jsonl``) and the setup it describes;
- ``report``: the end-of-run report printed when training ends;
- ``wandb``: the W&B run's config (the summary's setup), metric axes and run summary;
- ``logs``: reading a run back from a summary, a W&B run, a Lightning ``metrics.csv`` or a Trainer state;
- ``compare``: runs compared with confidence intervals, and the CI gate;
- ``plot``: the MFU and loss curves of one run or several, drawn into an image;
- ``labels``: a short name per run for tables and legends.

Nothing is imported here: the modules are imported by what uses them.
"""
