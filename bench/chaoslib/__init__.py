"""The standing chaos run (bench/chaos.py): a seeded fault schedule against real server processes on
both stores, a load of pipelines with watchers, and invariant checks afterwards.

Modules: schedule (faults from a seed), system (server processes, the S3 proxy, the small disk),
load (pipelines, watchers, hostile requests), invariants (the checks), run (the whole run)."""
