"""What every stage stands on, importing nothing above it: config.py the typed config and reader.py
the one reader of every config; model.py and base.py the models (assets/ holds the built-in one);
tokenizer.py its tokenizer; checkpoint.py run folders, checkpoints and resume; distributed.py torchrun
(DDP/FSDP2); lora.py adapters; import_model.py GGUF import; errors.py the one-line errors;
progress.py, trackers.py, report.py and card.py what a run shows and leaves behind."""
