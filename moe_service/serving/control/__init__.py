"""The control plane's parts, each testable without Ray: the worker pool (`pool`), the load window
(`window`), the rebalance protocol (`rebalance`), the HTTP surface (`http`), and the Ray launcher that
the service plugs into the pool (`ray_launcher`). `controller.py` wires them together."""
