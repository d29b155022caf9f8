"""The HTTP side of the ingress: middleware, body readers, the images service, response shaping.

Data flows one way: `middleware` (id, auth, deadline, envelope, metrics, log line) -> `bodies`
(multipart, JSON, data URLs, with limits) -> `service` (the images endpoints) -> a model client
-> `responses` (OpenAI's shapes). `errors` is the one place an exception becomes an envelope.
"""
