"""cert-renewer: the renewal job that keeps SMTP certificates fresh.

This package never imports Pulumi; it is what the scheduled machine runs.
"""

__version__ = "0.1.0"
