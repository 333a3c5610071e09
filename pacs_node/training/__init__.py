"""Training built-in models on phantoms: a recipe (YAML/JSON), cached cases, the loop, and the
bundle it writes in the registry's layout."""
