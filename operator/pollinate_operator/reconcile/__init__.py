"""Pure decisions: from desired and observed state to actions and status."""
