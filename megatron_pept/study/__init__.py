"""Studies of finished runs: method comparisons run side by side, their figures (training curves of several runs,
the rank of the weight updates) and their tables. Plotting needs the ``study`` extra (matplotlib)."""
