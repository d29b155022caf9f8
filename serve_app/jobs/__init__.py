"""Asynchronous image jobs on Ray Serve's task consumers (Celery on Redis).

`record` is a job as Redis holds it (the only module that knows its field names), `store` keeps
job state in Redis (one Lua script per state change), `backend` builds what both sides use,
`objects` turns a record into the wire's job object, `consumer` is the deployment that runs
queued jobs through the model clients, `webhooks` signs and delivers finished jobs,
`redis_server` runs the embedded Redis of `serve run`, `queue`/`queue_policy` configure Celery
and the consumer's autoscaling. Nothing here imports the HTTP package.
"""
