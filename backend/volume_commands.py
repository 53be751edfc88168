"""``nbs volume …``, ``nbs snapshot …`` and ``nbs node …``: managing the volume catalogue
and seeing the storage nodes its replicated volumes use.

Every command acts on the data directory (``--data-dir``, config ``data_dir``, default as in
backend.volumes.datadir.default_data_dir) in this process, or, when a server runs there or
``--server URL`` is given, through that server's API (backend.api.client).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from backend.volumes.model import (
    CreateRequest,
    ImportRequest,
    InvalidRequestError,
    NodeInfo,
    SnapshotInfo,
    VolumeError,
    VolumeInfo,
)
from backend.volumes.operations import VolumeOperations

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _labels(items: Sequence[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequestError(f"labels are KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def _volume_at_snapshot(text: str) -> tuple[str, str]:
    volume, sep, snapshot = text.partition("@")
    if not sep:
        raise InvalidRequestError(f"expected VOLUME@SNAPSHOT, got {text!r}")
    return volume, snapshot


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


class ProgressBar:
    """Progress of a long copy on stderr: a redrawn bar on a terminal, lines otherwise."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        percent = int(100 * done / total) if total else 100
        step = percent if self.tty else percent - percent % 10
        if step == self.last:
            return
        self.last = step
        rate = done / max(time.monotonic() - self.started, 1e-6)
        text = (
            f"{self.what}: {percent:3d}% ({human_size(done)} of {human_size(total)},"
            f" {human_size(int(rate))}/s)"
        )
        if self.tty:
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\r[{bar:<25}] {text}")
            if percent == 100:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _common() -> argparse.ArgumentParser:
    """Options every volume and snapshot command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="the catalogue's data directory")
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=Path(os.environ["NBS_CONFIG"]) if os.environ.get("NBS_CONFIG") else None,
        help="YAML configuration whose `storages:` profiles --storage may name, and whose"
        " `nodes:` `volume export` reads replicated volumes from (default: $NBS_CONFIG;"
        " without it, the running server's); otherwise ignored with a running server (it"
        " uses its own)",
    )
    common.add_argument(
        "--server",
        metavar="URL",
        help="act through the API of the nbs serve at URL (https://HOST:PORT, unix:PATH);"
        " default: the server of the data directory, if one runs",
    )
    common.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the API token for --server (default: $NBS_API_TOKEN)",
    )
    common.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="CA of the server's certificate (default: $NBS_API_CA, else the system's)",
    )
    return common


STORAGE_HELP = (
    "where the data lives: a profile from --config's `storages:` or inline, e.g. file"
    " (default), dir:path=DIR, s3:bucket=B,endpoint=URL, rados:pool=P, rbd:pool=P,"
    " rbd:pool=P,image=EXISTING, nbd:url=nbd://HOST:PORT/EXPORT;"
    " layers: +cache:size=256MiB, +retry:attempts=5"
    " (docs/storage.md)"
)


class _Leaves:
    """Adds the common options to every leaf command."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._common = _common()

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._sub.add_parser(
            name, parents=[self._common], **kwargs
        )
        return parser


def add_commands(sub: Any) -> None:
    volume = sub.add_parser("volume", help="create, list, resize, delete, import, export volumes")
    vsub = _Leaves(volume.add_subparsers(dest="volume_command", required=True, metavar="COMMAND"))

    create = vsub.add_parser("create", help="create a volume (empty and sparse, or from an image)")
    create.add_argument("name")
    create.add_argument("--size", help="e.g. 10GiB, 512MiB (default: the image's size)")
    create.add_argument("--from-image", metavar="PATH|URI", help="raw/qcow2/… file or nbd:// URI")
    create.add_argument("--description", default="")
    create.add_argument("--label", action="append", metavar="KEY=VALUE")
    create.add_argument("--read-only", action="store_true")
    create.add_argument(
        "--shared",
        action="store_true",
        help="let several clients hold it writable at once (a cluster filesystem's disk);"
        " by default a second client gets it read-only",
    )
    create.add_argument("--storage", metavar="SPEC|PROFILE", help=STORAGE_HELP)
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_create)

    listing = vsub.add_parser("list", help="list volumes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    info = vsub.add_parser("info", help="show one volume")
    info.add_argument("name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    resize = vsub.add_parser("resize", help="grow a volume (live); shrinking needs --allow-shrink")
    resize.add_argument("name")
    resize.add_argument("size")
    resize.add_argument("--allow-shrink", action="store_true")
    resize.set_defaults(func=cmd_resize)

    delete = vsub.add_parser("delete", help="delete a volume")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="even if open or with snapshots")
    delete.set_defaults(func=cmd_delete)

    imp = vsub.add_parser("import", help="create a volume from an image (like create --from-image)")
    imp.add_argument("name")
    imp.add_argument("source", metavar="PATH|URI")
    imp.add_argument("--size", help="default: the image's size")
    imp.add_argument("--description", default="")
    imp.add_argument("--storage", metavar="SPEC|PROFILE", help=STORAGE_HELP)
    imp.set_defaults(func=cmd_import)

    exp = vsub.add_parser("export", help="write a volume or snapshot to an image file")
    exp.add_argument("name", metavar="VOLUME[@SNAPSHOT]")
    exp.add_argument("dest", type=Path)
    exp.add_argument("--format", default="raw", help="qemu-img output format (raw, qcow2, …)")
    exp.set_defaults(func=cmd_export)

    clone = vsub.add_parser("clone", help="thin, instant writable copy of VOLUME@SNAPSHOT")
    clone.add_argument("source", metavar="VOLUME@SNAPSHOT")
    clone.add_argument("name")
    clone.add_argument("--description", default="")
    clone.add_argument("--json", action="store_true")
    clone.set_defaults(func=cmd_clone)

    scrub = vsub.add_parser(
        "scrub", help="compare a replicated volume's replicas (and repair to the majority)"
    )
    scrub.add_argument("name")
    scrub.add_argument(
        "--repair",
        action="store_true",
        help="write the majority's bytes over replicas that differ from it",
    )
    scrub.add_argument("--json", action="store_true")
    scrub.set_defaults(func=cmd_scrub)

    gc = vsub.add_parser("gc", help="clean up what a crash left behind")
    gc.set_defaults(func=cmd_gc)

    rep = vsub.add_parser("replica", help="add, remove or replace a replicated volume's replicas")
    rsub = _Leaves(rep.add_subparsers(dest="replica_command", required=True, metavar="COMMAND"))
    for verb, func, text in (
        ("add", cmd_replica_add, "a new replica on NODE (resynced by nbs serve)"),
        ("remove", cmd_replica_remove, "remove and delete the replica on NODE"),
    ):
        leaf = rsub.add_parser(verb, help=text)
        leaf.add_argument("volume")
        leaf.add_argument("node")
        leaf.add_argument("--json", action="store_true")
        leaf.set_defaults(func=func)
    replace = rsub.add_parser(
        "replace",
        help="a new replica on NEW takes the place of the one on OLD (OLD's node may be dead)",
    )
    replace.add_argument("volume")
    replace.add_argument("old", metavar="OLD")
    replace.add_argument("new", metavar="NEW")
    replace.add_argument("--json", action="store_true")
    replace.set_defaults(func=cmd_replica_replace)

    snap = sub.add_parser("snapshot", help="create, list, delete snapshots")
    ssub = _Leaves(snap.add_subparsers(dest="snapshot_command", required=True, metavar="COMMAND"))
    screate = ssub.add_parser("create", help="point-in-time snapshot, while the volume is in use")
    screate.add_argument("volume")
    screate.add_argument("name")
    screate.add_argument("--json", action="store_true")
    screate.set_defaults(func=cmd_snapshot_create)
    slist = ssub.add_parser("list", help="list snapshots")
    slist.add_argument("volume", nargs="?")
    slist.add_argument("--json", action="store_true")
    slist.set_defaults(func=cmd_snapshot_list)
    sdelete = ssub.add_parser("delete", help="delete VOLUME@SNAPSHOT")
    sdelete.add_argument("name", metavar="VOLUME@SNAPSHOT")
    sdelete.add_argument(
        "--flatten-clones",
        action="store_true",
        help="copy the snapshot's data into clones that depend on it first",
    )
    sdelete.set_defaults(func=cmd_snapshot_delete)

    node = sub.add_parser("node", help="the storage nodes replicated volumes use")
    nsub = _Leaves(node.add_subparsers(dest="node_command", required=True, metavar="COMMAND"))
    nlist = nsub.add_parser(
        "list", help="each storage node: reachable or not, and the replicas it holds"
    )
    nlist.add_argument("--json", action="store_true")
    nlist.set_defaults(func=cmd_node_list)
    ninfo = nsub.add_parser("info", help="one storage node and every replica it holds")
    ninfo.add_argument("name")
    ninfo.add_argument("--json", action="store_true")
    ninfo.set_defaults(func=cmd_node_info)


def _service(args: argparse.Namespace) -> VolumeOperations:
    from backend.volume_clients import open_client  # noqa: PLC0415

    client = open_client(args)
    args.opened_client = client
    return client


def _export_client(args: argparse.Namespace) -> VolumeOperations:
    from backend.volume_clients import export_client  # noqa: PLC0415

    # Storage nodes from --config, else as the running server lists them (a replicated
    # volume is read from its replicas).
    client = export_client(args)
    args.opened_client = client
    return client


def _show_volume(info: VolumeInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_json(), indent=2))
        return
    rows = [
        ("name", info.name),
        ("uid", info.uid),
        ("size", f"{human_size(info.size)} ({info.size} bytes)"),
        ("used", human_size(info.used_bytes)),
        ("read-only", "yes" if info.read_only else "no"),
        ("origin", info.origin or "-"),
        ("snapshots", ", ".join(info.snapshots) or "-"),
        ("shared", "yes" if info.shared else "no"),
        ("epoch", str(info.epoch)),
        ("connections", str(info.connections)),
        *(
            (
                "held by",
                f"{h.peer} {'writable' if h.writable else 'read-only'}"
                + ("" if h.epoch is None else f" epoch {h.epoch}")
                + " since "
                + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.since)),
            )
            for h in info.holders
        ),
        *_replication_rows(info),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items())) or "-"),
        ("description", info.description or "-"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
    ]
    for key, value in rows:
        print(f"{key + ':':<13}{value}")


def _replication_rows(info: VolumeInfo) -> list[tuple[str, str]]:
    r = info.replication
    if r is None:
        return []
    source = "serving engine" if r.live else "catalogue"
    rows = [
        (
            "replication",
            f"epoch {r.epoch}, generation {r.generation}, min_insync {r.min_insync} (from the"
            f" {source})",
        )
    ]
    for replica in r.replicas:
        state = replica.state.replace("_", "-")
        if replica.resync_total is not None and replica.resync_done is not None:
            done, total = replica.resync_done, replica.resync_total
            state += f" {done * 100 // total if total else 100}% ({done}/{total} bytes)"
        if replica.state == "leftover":
            state += f" ({replica.last_error})"
        elif replica.last_error:
            state += f" (failed: {replica.last_error})"
        if r.live and replica.state != "leftover":
            state += f", {replica.in_flight} in flight"
        rows.append(("replica", f"{replica.node} {replica.volume} {state}"))
    if r.last_scrub is not None:
        scrubbed = r.last_scrub
        text = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(scrubbed.finished))
            + f", {human_size(scrubbed.compared)} compared, {len(scrubbed.mismatches)}"
            " mismatch(es)"
        )
        if scrubbed.mismatches:
            text += f", {scrubbed.unresolved} unresolved"
        if scrubbed.failed:
            text += f", failed: {', '.join(scrubbed.failed)}"
        rows.append(("last scrub", text))
    return rows


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_create(args: argparse.Namespace) -> int:
    service = _service(args)
    request = CreateRequest(
        args.name,
        args.size,
        description=args.description,
        labels=_labels(args.label),
        read_only=args.read_only,
        storage=args.storage,
        shared=args.shared,
    )
    if args.from_image:
        info = service.import_image(
            ImportRequest(request, args.from_image),
            progress=ProgressBar(f"importing {args.name}"),
        )
    else:
        adopted = args.storage and ("image=" in args.storage or "url=" in args.storage)
        if not args.size and not adopted:
            raise InvalidRequestError("--size is required without --from-image")
        # An empty --size is no size here (an adopted RBD image's own), as it always was.
        info = service.create(dataclasses.replace(request, size=args.size or None))
    if args.json:
        _show_volume(info, True)
    else:
        print(f"created volume {info.name} ({human_size(info.size)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    service = _service(args)
    request = CreateRequest(
        args.name, args.size, description=args.description, storage=args.storage
    )
    info = service.import_image(
        ImportRequest(request, args.source), progress=ProgressBar(f"importing {args.name}")
    )
    print(f"imported {args.source} into volume {info.name} ({human_size(info.size)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # Exporting only reads layer files: done here even while a local server runs (snapshots
    # never change; a live volume may, so export a snapshot for a consistent image).
    service = _service(args) if args.server else _export_client(args)
    service.export_image(
        args.name, args.dest, fmt=args.format, progress=ProgressBar(f"exporting {args.name}")
    )
    print(f"exported {args.name} to {args.dest} ({args.format})")
    return 0


class _Listed(Protocol):
    def to_json(self) -> dict[str, Any]: ...


def print_listing(
    items: Sequence[_Listed],
    as_json: bool,
    empty: str,
    headers: Sequence[str],
    rows: Callable[[], Sequence[Sequence[str]]],
) -> bool:
    """What a list command prints: the items as JSON, ``empty``, or a table of ``rows()``;
    True if it was the table."""
    if as_json:
        print(json.dumps([item.to_json() for item in items], indent=2))
    elif not items:
        print(empty)
    else:
        print_table(headers, rows())
        return True
    return False


def cmd_list(args: argparse.Namespace) -> int:
    volumes = _service(args).list()
    print_listing(
        volumes,
        args.json,
        "no volumes",
        ["NAME", "SIZE", "USED", "RO", "ORIGIN", "SNAPSHOTS", "CONN", "DESCRIPTION"],
        lambda: [
            [
                v.name,
                human_size(v.size),
                human_size(v.used_bytes),
                "ro" if v.read_only else "",
                v.origin or "",
                str(len(v.snapshots)),
                str(v.connections),
                v.description,
            ]
            for v in volumes
        ],
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    _show_volume(_service(args).info(args.name), args.json)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    info = _service(args).resize(args.name, args.size, allow_shrink=args.allow_shrink)
    print(f"volume {info.name} is now {human_size(info.size)} ({info.size} bytes)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _service(args).delete(args.name, force=args.force)
    print(f"deleted volume {args.name}")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    volume, snapshot = _volume_at_snapshot(args.source)
    info = _service(args).clone(volume, snapshot, args.name, description=args.description)
    if args.json:
        _show_volume(info, True)
    else:
        print(f"cloned {args.source} as volume {info.name}")
    return 0


def cmd_replica_add(args: argparse.Namespace) -> int:
    _show_volume(_service(args).add_replica(args.volume, args.node), args.json)
    return 0


def cmd_replica_remove(args: argparse.Namespace) -> int:
    _show_volume(_service(args).remove_replica(args.volume, args.node), args.json)
    return 0


def cmd_replica_replace(args: argparse.Namespace) -> int:
    _show_volume(_service(args).replace_replica(args.volume, args.old, args.new), args.json)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    removed = _service(args).gc()
    print("\n".join(f"removed {r}" for r in removed) or "nothing to clean up")
    return 0


def _show_snapshot(snap: SnapshotInfo) -> list[str]:
    return [
        f"{snap.volume}@{snap.name}",
        human_size(snap.size),
        human_size(snap.used_bytes),
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.created)),
        ", ".join(snap.clones),
    ]


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    snap = _service(args).snapshot(args.volume, args.name)
    if args.json:
        print(json.dumps(snap.to_json(), indent=2))
    else:
        print(f"created snapshot {snap.volume}@{snap.name}")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    snaps = _service(args).snapshots(args.volume)
    print_listing(
        snaps,
        args.json,
        "no snapshots",
        ["SNAPSHOT", "SIZE", "USED", "CREATED", "CLONES"],
        lambda: [_show_snapshot(s) for s in snaps],
    )
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    volume, snapshot = _volume_at_snapshot(args.name)
    _service(args).delete_snapshot(
        volume,
        snapshot,
        flatten_clones=args.flatten_clones,
        progress=ProgressBar(f"flattening clones of {args.name}"),
    )
    print(f"deleted snapshot {args.name}")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    """Exit 0 if the replicas are (now) the same, 1 if a mismatch is left or a replica failed."""
    report = _service(args).scrub(
        args.name, repair=args.repair, progress=ProgressBar(f"scrubbing {args.name}")
    )
    clean = report.unresolved == 0 and not report.failed
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if clean else EXIT_FAILURE
    print(
        f"scrubbed {report.volume}: {human_size(report.compared)} compared on"
        f" {', '.join(report.replicas)} in {report.seconds:.1f} s,"
        f" {len(report.mismatches)} mismatch(es)"
        + (f", {len(report.mismatches) - report.unresolved} repaired" if report.repair else "")
    )
    if report.mismatches:
        print_table(
            ["OFFSET", "LENGTH", "REPLICAS", "OUTCOME"],
            [
                [
                    str(m.offset),
                    str(m.length),
                    ",".join(m.replicas),
                    "repaired"
                    if m.repaired
                    else ("differ from the majority" if m.majority else "no majority"),
                ]
                for m in report.mismatches
            ],
        )
    if report.failed:
        print(f"failed (now out, to be resynced): {', '.join(report.failed)}")
    if any(not m.majority for m in report.mismatches):
        print("no majority agrees on some bytes: nothing can say which replica is right")
    elif report.unresolved:
        print(f"repair with: nbs volume scrub {report.volume} --repair")
    return 0 if clean else EXIT_FAILURE


def _node_state(node: NodeInfo) -> str:
    if not node.configured:
        return "removed"
    return "up" if node.reachable else "down"


def _in_sync(node: NodeInfo) -> int:
    return sum(r.state == "in_sync" for r in node.replicas)


def cmd_node_list(args: argparse.Namespace) -> int:
    nodes = _service(args).nodes()
    shown = print_listing(
        nodes,
        args.json,
        "no storage nodes (the config's nodes: names them)",
        ["NAME", "STATE", "REPLICAS", "IN-SYNC", "VERSION", "API", "NBD"],
        lambda: [
            [
                n.name,
                _node_state(n),
                str(len(n.replicas)),
                str(_in_sync(n)),
                n.version or "-",
                n.api or "-",
                n.nbd or "-",
            ]
            for n in nodes
        ],
    )
    for n in nodes if shown else ():
        if n.error:
            print(f"{n.name}: {n.error}")
    return 0


def cmd_node_info(args: argparse.Namespace) -> int:
    node = _service(args).node(args.name)
    if args.json:
        print(json.dumps(node.to_json(), indent=2))
        return 0
    state = _node_state(node) + (f" (nbs {node.version})" if node.version else "")
    rows = [
        ("name", node.name),
        ("state", state),
        ("api", node.api or "-"),
        ("nbd", node.nbd or "-"),
        *((("error", node.error),) if node.error else ()),
        ("replicas", f"{len(node.replicas)} ({_in_sync(node)} in sync)"),
    ]
    for key, value in rows:
        print(f"{key + ':':<13}{value}")
    if node.replicas:
        print()
        print_table(
            ["VOLUME", "REPLICA", "STATE"],
            [[r.volume, r.replica, r.state.replace("_", "-")] for r in node.replicas],
        )
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        result: int = args.func(args)
    except InvalidRequestError as err:
        print(f"nbs: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    except VolumeError as err:
        print(f"nbs: error: {err.message}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        client = getattr(args, "opened_client", None)
        if client is not None:
            client.close()
    return result
