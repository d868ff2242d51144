"""Where the sessions of an AgentCgroup folder are. Layouts read (any mix of them):

    DIR/<task>/{tool_calls.json, resources.json, meta.json, llm_calls.json}   our reshaped copy
    DIR/<task>/{tool_calls.json, resources.json, results.json, trace.jsonl}   flat, as published
    DIR/<task>/attempt_<n>/{...the same files...}                             one session per attempt
    DIR/<set>/<task>/...                                                      sets of tasks (a few levels)

DIR itself may be one task or one session folder. A session folder is one holding any of
SESSION_FILES; a task folder holds session files or `attempt_<n>` folders. With
`attempt=N` only `attempt_N` of each task is read; a flat task (no attempt folders) is
read as it is. A folder that is none of these is reported, not silently passed over.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SESSION_FILES = ("tool_calls.json", "results.json", "meta.json", "trace.jsonl", "llm_calls.json",
                 "resources.json")
ATTEMPT_RE = re.compile(r"attempt_(\d+)")
MAX_DEPTH = 3                  # DIR/<set>/<group>/<task>: deeper folders are not looked into
MAX_TASKS = 100_000


@dataclass(frozen=True)
class SessionDir:
    task: str                  # the task's path below DIR ("Azure__azure-cli-4265", "set/task")
    attempt: int | None        # None: a flat task folder
    path: Path

    @property
    def session_id(self) -> str:
        return self.task if self.attempt is None else f"{self.task}/attempt_{self.attempt}"


@dataclass
class TaskDir:
    task: str
    path: Path
    sessions: list[SessionDir] = field(default_factory=list)
    problem: str | None = None   # why this task yields no session folder


def is_session_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in SESSION_FILES)


def attempts_of(path: Path) -> dict[int, Path]:
    out = {}
    for child in path.iterdir():
        match = ATTEMPT_RE.fullmatch(child.name)
        if match and child.is_dir():
            out[int(match.group(1))] = child
    return dict(sorted(out.items()))


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _task(name: str, path: Path, attempt: int | None) -> TaskDir:
    attempts = attempts_of(path)
    task = TaskDir(name, path)
    if not attempts:
        task.sessions.append(SessionDir(name, None, path))
    elif attempt is None:
        task.sessions += [SessionDir(name, n, p) for n, p in attempts.items()]
    elif attempt in attempts:
        task.sessions.append(SessionDir(name, attempt, attempts[attempt]))
    else:
        task.problem = f"no attempt_{attempt} (it has {', '.join(f'attempt_{n}' for n in attempts)})"
    return task


def discover(directory: Path, attempt: int | None = None) -> list[TaskDir]:
    """The task folders below `directory`, in name order, each with its session folders."""
    if is_session_dir(directory) or attempts_of(directory):
        return [_task(directory.name, directory, attempt)]
    tasks: list[TaskDir] = []
    _walk(directory, "", 0, attempt, tasks)
    return tasks


def _walk(directory: Path, prefix: str, depth: int, attempt: int | None, tasks: list[TaskDir]) -> None:
    for child in _subdirs(directory):
        if len(tasks) >= MAX_TASKS:
            return
        name = prefix + child.name
        if is_session_dir(child) or attempts_of(child):
            tasks.append(_task(name, child, attempt))
        elif depth + 1 < MAX_DEPTH and _subdirs(child):
            _walk(child, name + "/", depth + 1, attempt, tasks)
        else:
            tasks.append(TaskDir(name, child, problem="holds no session files (" + ", ".join(SESSION_FILES)
                                 + ") and no attempt_<n> folders"))
