"""Local stand-ins for the outside world: Pebble, DNS, SMTP and the Cloudflare, Fly and
MailPace APIs, all on loopback. Used by `renewer demo` and by the integration tests,
so the demo is always a tested path. Never imported by the job's production path."""
