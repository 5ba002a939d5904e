"""Operations: running folds (in turn, side by side on GPUs, under a deadline), bundles between machines, the runs
table and the throughput benchmark. Imports the main path; the main path never imports it."""
