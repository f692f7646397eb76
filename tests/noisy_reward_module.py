"""A reward module that prints when imported (in the driver, then in every worker)."""

print("noisy module imported")
