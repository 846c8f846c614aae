"""The leaf library every service shares: config machinery, bus, errors and their one map,
gRPC server and service runner, weights follower, weight store, metric helpers, algorithms.
It imports no service (checked by `lint-imports`)."""
