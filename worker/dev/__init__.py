"""For a person trying the worker, and for the tests: embedded services (Tansu, valkey),
clients (send, tail, replay) and the worker-process harness. Only ``worker.cli`` imports it."""
