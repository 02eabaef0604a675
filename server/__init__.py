"""deltascope server: live diagnostics, failure detection and alerts for running DDL jobs.

Never imports torch, ``ddl`` or the torch parts of ``probes``: it runs in a small container.
"""
