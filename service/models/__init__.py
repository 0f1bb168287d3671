"""A model's life: registry, re-index, shadow evaluation, switch and evaluation."""
