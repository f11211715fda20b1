"""The Pulumi side of cert-renewer: stack config and the two components.

Boundary: this package never imports ``renewer`` (the job), and ``renewer`` never imports
Pulumi. The program talks to the job only through two stable interfaces: the renewal
config JSON (``RENEWER_CONFIG``) and the provisioning CLI ``python -m renewer.provision``,
whose command lines are rendered here (``infra.commands``, ``infra.flyctl``).
"""
