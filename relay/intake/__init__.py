"""Intake: SMTP sessions in, durable parts out."""
