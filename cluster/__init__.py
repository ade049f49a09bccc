"""The Ray cluster a command runs on: the session every stage and the endpoint open (cluster/session.py), the setup
hook of a local session's workers (cluster/haproxy_pages.py), and the cluster's YAML and scripts beside them."""
