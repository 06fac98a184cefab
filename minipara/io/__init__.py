"""Everything that reads or writes files: checkpoints, model conversion, tokenizers, adapter
files, PEFT import/export, atomic writes and locks."""
