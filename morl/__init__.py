"""morl: Mixed On-policy RL (MORL) post-training for vision-language models."""
