"""Krablet: a job system on PostgreSQL shards.

Modules, one concept each:
  schema.py    tables, indexes and the versioned migration table
  kinds.py     the registry of job kinds (payload validator + handler)
  queue.py     the claim / heartbeat / complete / fail SQL for one shard
  shards.py    routing by idempotency key, all-or-nothing submit, shard health, cross-shard deps
  dsn.py       connection strings: sources, masked printing, permanent vs transient failures
  embedded.py  a local PostgreSQL when no DSN is configured
  worker.py    the worker loop and the process pool
  cli.py       ``python -m krablet init|submit|worker|drain|status|retry``
"""
