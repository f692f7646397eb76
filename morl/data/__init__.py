"""Training data: the row contract, loading and checking files, the task mixture, the prompt source, encoding."""
