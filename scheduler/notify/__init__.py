"""The notifier: webhooks and mail for job events (docs/ARCHITECTURE.md, "Notifications")."""
