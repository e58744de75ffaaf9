"""The only place that talks to hosts: SSH connections, scripts and their framing."""
