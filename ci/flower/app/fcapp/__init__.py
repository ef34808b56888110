"""The comparison's task as a Flower App (see ../pyproject.toml)."""
