"""Training: the loop every task and method shares, the schedule, the reference rows (probe,
WiSE-FT, zero-shot), deviation, evaluation and BatchNorm re-estimation."""
