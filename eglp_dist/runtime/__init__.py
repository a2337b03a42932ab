"""Everything that crosses ranks: launch environment, engines (DDP / DeepSpeed ZeRO), EMA,
checkpoints and the few named collectives other modules may use."""
