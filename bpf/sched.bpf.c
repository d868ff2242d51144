/* sched: CPU time and a run-queue latency histogram per cgroup, with no program of its own
 * on the scheduler's path. Each tracked task's own scheduler counters (task_struct
 * se.sum_exec_runtime, sched_info.run_delay and .pcount; offsets from BTF) are taken as its
 * bases when it is first seen in a watched cgroup (fork: zero; exec: as they are), and
 * their growth is charged at its exit (process.bpf.c, acg_charge_sched in shared.bpf.c):
 * CPU time, and run_delay / pcount as the mean wait before each of its slices, counted
 * pcount times in the histogram. So a call's figures are complete once its tasks have
 * exited, which is when a tool call's record is read. The opt-in concern `switches`
 * charges slice by slice instead, at a cost on every context switch of a watched task.
 * Needs the process concern and CONFIG_SCHED_INFO (task delay accounting or schedstats). */
#include "agentcg.h"
