"""Replicated volumes: what the engine keeps to fan writes out to N replicas safely.

    bitmap.py       bit operations on a bytearray bitmap (set, clear, count, runs)
    mapfile.py      the region map's file format: two headers, plane slots
    tracking.py     RegionMap: persistent change tracking (in-doubt and missed planes)
    membership.py   Membership, its transitions, and the compare-and-swap store interface
    policy.py       ReplicationPolicy: min_insync, what to do below it, timeouts, resync rate
    copying.py      copying regions between members (holes skipped) and the rate limit
    engine.py       ReplicatedStorage: the engine (fan-out, failure before ack, resync)
    status.py       what an engine reports: EngineStatus, MemberStatus, ResyncProgress
    supervisor.py   ResyncSupervisor: nbs serve's background resync of returning members

The design, and what of it is built so far: docs/replication.md.  Why the tracking is in
the engine: docs/decisions/0095-engine-side-change-tracking.md.
"""
