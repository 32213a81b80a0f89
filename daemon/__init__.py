"""ticketd: an unattended coding-agent daemon for Backlog.md tickets."""

__version__ = "0.1.0"
