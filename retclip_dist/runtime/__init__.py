"""What a running process needs below the trainer: where its worker processes come from and the watchdog
that ends a rank which stopped making progress."""
