"""Durable mail outbox and SMTP delivery."""
