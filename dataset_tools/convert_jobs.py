"""`deit3-convert SRC OUT --shards N --submit | --local`: one task per shard (and one for the held-out split) as a
submitit job array. Each task is the same command with `--shard-index I`, so a requeued or repeated task skips
its shard once complete; whichever task finishes last writes the manifest. `--local` runs the tasks through
submitit's local executor (one at a time, each using all cores) and waits; `--submit` returns once Slurm has them.
"""

from __future__ import annotations

import os

from .atomic import check_folder_output
from .errors import ConversionError, SourceError


class ShardTask:
    """What array task I runs: `deit3-convert ARGV --shard-index I --quiet`; a non-zero exit fails the task.
    `main` is convert.main, handed in (pickled by reference with the task) rather than imported: convert imports
    this module."""

    def __init__(self, main, argv: list[str]):
        self.main, self.argv = main, list(argv)

    def __call__(self, index: int) -> int:
        code = self.main([*self.argv, "--shard-index", str(index), "--quiet"])
        if code != 0:
            raise RuntimeError(
                f"deit3-convert --shard-index {index} exited with {code} (its stderr is in the task's log)"
            )
        return code

    def checkpoint(self, index: int):
        # Preempted or out of time: requeue the same task; it verifies and skips its shard if it got that far.
        import submitit  # optional (only --submit/--local need it): here, where submitit already runs the task

        return submitit.helpers.DelayedSubmission(ShardTask(self.main, self.argv), index)


def _task_argv(argv: list[str]) -> list[str]:
    """The command line without the options that only say where and how to send the tasks."""
    drop_flag = {"--submit", "--local"}
    drop_value = {"--partition", "--account", "--timeout-min", "--cpus-per-task", "--array-parallelism"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop_flag:
            continue
        if name in drop_value:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def submit_shards(main, args, argv: list[str], console) -> int:
    """Send the shard tasks of `deit3-convert ARGV` (`main`: convert.main, what each task runs)."""
    try:
        import submitit  # optional: only --submit/--local need it
    except ImportError as e:
        raise ConversionError(f"--submit/--local need submitit ({e}): pip install submitit") from None
    problem = check_folder_output(args.out)
    if problem:
        raise SourceError(f"cannot write {args.out}: {problem}")
    tasks = args.shards + (1 if args.holdout else 0)
    folder = os.path.join(args.out, "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if args.local else None)
    if args.local:
        executor.update_parameters(timeout_min=args.timeout_min, name="deit3-convert")
    else:
        params = {
            "name": "deit3-convert",
            "timeout_min": args.timeout_min,
            "cpus_per_task": args.cpus_per_task,
            "nodes": 1,
            "tasks_per_node": 1,
            "slurm_array_parallelism": args.array_parallelism,
        }
        for key, value in (("slurm_partition", args.partition), ("slurm_account", args.account)):
            if value:
                params[key] = value
        executor.update_parameters(**params)
    task = ShardTask(main, _task_argv(argv))
    if args.local:
        # The local executor would run array tasks concurrently, each with every core: one at a time is faster.
        jobs = []
        for i in range(tasks):
            jobs.append(executor.submit(task, i))
            jobs[-1].result()
    else:
        jobs = executor.map_array(task, range(tasks))
    ids = ", ".join(str(j.job_id) for j in jobs[:3]) + (" ..." if len(jobs) > 3 else "")
    if args.local:
        console.print(f"{tasks} shard task(s) done locally (logs: {folder}); manifest: {args.out}/manifest.json")
    else:
        console.print(
            f"submitted {tasks} shard task(s) as a job array ({ids}); logs: {folder}. The last task to "
            f"finish writes {args.out}/manifest.json; rerun the same command to resubmit missing shards."
        )
    return 0
