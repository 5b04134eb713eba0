"""Delivery: from a spooled recipient to a remote server's reply.

MX resolution (resolve), per-destination queues (queue), the retry schedule
(schedule, pure), the SMTP client core (smtp_proto, sans-IO) and the
connection driver (session, the only part that does I/O).
"""
