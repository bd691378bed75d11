"""`deit3-fast stage`: a shard set or .beton copied to node-local disk (dataset_tools/stage.py copies it)."""

from __future__ import annotations

import json

NAME = "stage"
HELP = "copy a shard set or .beton to node-local disk, verified and resumable"
DESCRIPTION = (
    "Copies SRC (a shard folder, its manifest.json, or a .beton) into the folder DEST, each file "
    "atomically and checked against the manifest's sha256 as it is copied; files already staged are "
    "skipped, the manifest goes last. data.stage_to does the same at job start, once per node."
)


def add_arguments(st) -> None:
    st.add_argument("src", metavar="SRC", help="a shard folder, its manifest.json, or a .beton")
    st.add_argument("dest", metavar="DEST", help="the node-local folder to copy into (created if missing)")
    st.add_argument(
        "--merge",
        action="store_true",
        help="write a shard set into one DEST/merged.beton (for the ffcv engine, which reads one file)",
    )
    st.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from dataset_tools.beton import BetonError
    from dataset_tools.stage import stage
    from pipelines import DataError

    with Progress(
        TextColumn("[bold]staging[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        disable=args.quiet,
        transient=True,
    ) as progress:
        task = progress.add_task("stage", total=None)
        try:
            where = stage(args.src, args.dest, progress=lambda n: progress.advance(task, n), merge_shards=args.merge)
        except BetonError as e:
            raise DataError(str(e)) from None
        except OSError as e:
            raise DataError(f"staging into {args.dest} failed: {e.strerror or e}") from None
    print(json.dumps({"staged": str(where), "use": f"data.train: {where}"}))
    return 0
