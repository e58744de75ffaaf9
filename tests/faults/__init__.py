"""Fault injection for the connection tests: a loopback OpenSSH sshd we control, and fake
SSH-ish TCP servers (blackhole, frozen banner, drop mid-transfer)."""
