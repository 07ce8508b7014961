"""arssr-jax."""
