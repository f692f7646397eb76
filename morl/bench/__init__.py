"""`morl bench ...`: the framework's parts timed against bare baselines in the same run."""
