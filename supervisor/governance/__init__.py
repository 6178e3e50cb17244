"""The gate and the rules it applies: policy, approvals and their escalation, model
access and token budgets, and policy replay."""
