"""modelyard over a Ray cluster (docs/cluster.md, issue 13): the pure rules here import nothing of Ray."""
