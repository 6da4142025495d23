"""Reports people read: the steward summary, the reviewer report, figures and tables."""
