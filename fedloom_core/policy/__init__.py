"""Policy rules, client selection, trust and update validation."""
