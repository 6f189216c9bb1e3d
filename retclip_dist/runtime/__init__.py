"""What a running process needs, below the trainer: the launcher's environment, the stop signals, process
lifetime, where its worker processes come from and the watchdog that ends a rank which stopped making
progress. Nothing here imports from ``train/`` or ``launch/`` (tests/test_layers.py)."""
