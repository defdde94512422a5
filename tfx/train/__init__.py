"""Training: ``tfx.train.run.train(cfg, run_dir)`` runs one job from a composed config."""
