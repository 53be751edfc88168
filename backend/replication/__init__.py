"""Replicated volumes: what the engine keeps to fan writes out to N replicas safely.

    bitmap.py       bit operations on a bytearray bitmap (set, clear, count, runs)
    mapfile.py      the region map's file format: two headers, plane slots
    tracking.py     RegionMap: persistent change tracking (in-doubt and missed planes)
    membership.py   Membership, its transitions, and the compare-and-swap store interface
    policy.py       ReplicationPolicy: min_insync and its policy, timeouts, resync rate
    copying.py      copying a range between members (holes skipped), the resync token bucket
    engine.py       ReplicatedStorage: fan-out, failure before ack, fencing, reconcile, resync,
                    scrub
    scrub.py        comparing the replicas' bytes: differing blocks, the majority, the report
    status.py       the engine's status records (per member state, counters, resync progress)
    supervisor.py   ResyncSupervisor: nbs serve's background resync of returning members

The design, and what of it is built so far: docs/replication.md.  Why the tracking is in
the engine: docs/decisions/0095-engine-side-change-tracking.md.
"""
