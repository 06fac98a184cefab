"""The papers' training recipe: the trainer, whole runs, tasks and metrics, result tables,
several processes."""
