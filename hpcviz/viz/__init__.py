"""The visualization array: the plan, one task's shard, collation, projections, submission, a run's state."""
