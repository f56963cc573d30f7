"""The tiny target and draft of tests/edge_node (module-scoped)."""

from tests.edge_node.conftest import draft, target  # noqa: F401
