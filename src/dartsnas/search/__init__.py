"""The continuous relaxation (search networks) and the bilevel optimiser (architect)."""
