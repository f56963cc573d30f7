"""Client-facing gateway, placement and routing, Ray bootstrap, and the `edgecloud` CLI."""
