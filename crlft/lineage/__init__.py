"""Lineage: the MLflow model registry as the product uses it. Every trained model is a version, evaluations are
recorded on it, and the `champion` alias only moves to a version that is at least as good on the same evaluation
suite.

    tags.py          the crlft.* tag names, how their keys are made and read
    versions.py      models:/ URIs, looking a version up, listing them
    registration.py  an exported folder registered as a new version, with its lineage
    cache.py         the local download cache serving loads registered versions from
    evaluation.py    evaluation figures recorded on a version; what "the same suite" means
    promotion.py     the promotion policy and the record of each decision
    lock.py          the lock that lets one promotion decide at a time

Works the same against the embedded SQLite store and a real tracking server (the URI comes from
`crlft.tracking.setup_mlflow`: --mlflow-uri > config > MLFLOW_TRACKING_URI > the local SQLite file). Every function
talks through its own `MlflowClient` (`crlft.tracking.client_for`), never the fluent API's global active run, so
threads can promote at once.
"""
