"""Training: ``tfx.train.run.train(cfg, run_dir)`` runs one job from a composed config;
``tfx.train.build.build`` is the build order it (and every other entry point) uses."""
