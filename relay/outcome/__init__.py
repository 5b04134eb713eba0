"""Outcomes of delivery attempts: what a reply means, and the bounce it causes.

``classify`` turns a ``Reply`` and the stage it came at into an ``Outcome``
(delivered, deferred or bounced; for which scope; which failure class).
``bounce`` builds the RFC 3464 delivery status notification that goes back
to the envelope sender.  Both are pure: no I/O, no clock, no event loop.
"""
