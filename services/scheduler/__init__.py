"""The scheduler service: fairness policy, preemption, block tables, and the Generate API."""
