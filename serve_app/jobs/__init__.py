"""Asynchronous image jobs on Ray Serve's task consumers (Celery on Redis).

`store` keeps job state in Redis, `payload` turns a job into bytes and back, `consumer` is the
deployment that runs queued jobs through the model deployments, `webhooks` signs and delivers
finished jobs, `redis_server` runs the embedded Redis of `serve run`.
"""
