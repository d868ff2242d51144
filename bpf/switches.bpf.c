/* switches (opt-in, needs "sched"): CPU time and run-queue waits charged slice by slice,
 * and tasks moved into a watched cgroup after they started found at their first switch.
 * Without it the sched concern charges each task's whole life at its exit (shared.bpf.c,
 * acg_charge_sched), which costs nothing per context switch.
 *
 * At each switch-out of a watched task (the current one: filtered by its cgroup first) the
 * task's own scheduler counters are read (se.sum_exec_runtime, sched_info.run_delay and
 * .pcount; offsets from BTF) and their growth since its last switch-out is charged: CPU
 * time, and run_delay / pcount as the waits before each of its slices. No program runs on
 * wakeups and nothing runs for unwatched tasks beyond the filter. Before, sched_wakeup
 * stamped each wake-up in a map and sched_switch looked up every next task (two programs
 * and two map operations on every switch on the host). Needs CONFIG_SCHED_INFO (task
 * delay accounting or schedstats; /proc/<pid>/schedstat exists). */
#include "agentcg.h"

/* sched_switch's raw prev_state is the task's __state: TASK_DEAD (0x80) at an exiting
 * task's last switch */
#define TASK_DEAD_STATE 0x80
/* task_struct.flags: past sched_process_exit (include/linux/sched.h, unchanged since 2.6) */
#define PF_EXITING 0x00000004

/* sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
 * unsigned int prev_state): runs in prev's context, so prev's cgroup is the current one. */
int acg_switches__sched__sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct acg_task *t = tasks.lookup(&tid);
    if (!t) {
        u32 prev_state = ctx->args[3];
        if ((prev_state & TASK_DEAD_STATE) ||
            (acg_read_u32((void *)bpf_get_current_task(), ACG_OFF_TASK_FLAGS) & PF_EXITING))
            return 0;
        acg_track(tid, cg, 0);  /* moved in after it started: found here (not once exiting) */
        t = tasks.lookup(&tid);
        if (!t)
            return 0;
    }
    acg_charge_sched(c, t);
    return 0;
}
