"""Fine-tuning with `Trainer`: the scripts' arguments and run (`run`), the pruning curriculum (`curriculum`) and the
task metrics (`metrics`)."""
