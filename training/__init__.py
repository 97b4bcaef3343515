"""Training LoFA checkpoints: dataset building, Stage-I/Stage-II trainers, evaluation (`python -m training`)."""
