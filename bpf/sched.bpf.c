/* sched: CPU time and a run-queue latency histogram per cgroup, from sched_switch and
 * sched_wakeup (the woken task is not current there, so it is found in `tasks`). */
#include "agentcg.h"

/* sched_switch's raw prev_state is the task's __state: TASK_RUNNING (0) when it was
 * preempted or yielded, TASK_DEAD (0x80) at an exiting task's last switch */
#define TASK_RUNNING_STATE 0
#define TASK_DEAD_STATE 0x80
/* task_struct.flags: past sched_process_exit (include/linux/sched.h, unchanged since 2.6) */
#define PF_EXITING 0x00000004

BPF_PERCPU_ARRAY(oncpu_since, u64, 1);
BPF_TABLE("lru_hash", u32, struct acg_stamp, runq_since, MAX_TASKS);
BPF_HASH(runq_hist, u64, struct acg_hist, MAX_CGROUPS);

static __always_inline u32 acg_log2(u64 v)
{
    u32 r = 0, shift;
    shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
    shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
    shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
    shift = (v > 0xF) << 2; v >>= shift; r |= shift;
    shift = (v > 0x3) << 1; v >>= shift; r |= shift;
    r |= (v >> 1);
    return r;
}

static __always_inline void acg_enqueued(u32 tid, u64 cg, u64 now)
{
    struct acg_stamp s = {.cgroup_id = cg, .ns = now};
    runq_since.update(&tid, &s);
}

/* sched_wakeup(struct task_struct *p) and sched_wakeup_new(p): p is not current. */
static __always_inline int acg_woken(void *p)
{
    u32 tid = acg_read_u32(p, ACG_OFF_TASK_PID);
    struct acg_task *t = tasks.lookup(&tid);
    if (t && acg_counters_of(t->cgroup_id))
        acg_enqueued(tid, t->cgroup_id, bpf_ktime_get_ns());
    return 0;
}

int acg_sched__sched__sched_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
    return acg_woken((void *)ctx->args[0]);
}

int acg_sched__sched__sched_wakeup_new(struct bpf_raw_tracepoint_args *ctx)
{
    return acg_woken((void *)ctx->args[0]);
}

/* sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
 * unsigned int prev_state): runs in prev's context, so prev's cgroup is the current one. */
int acg_sched__sched__sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    u64 now = bpf_ktime_get_ns();
    int zero = 0;
    u64 *since = oncpu_since.lookup(&zero);
    if (!since)
        return 0;
    u64 start = *since;
    *since = now;
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (c) {
        u32 prev = bpf_get_current_pid_tgid();
        u32 prev_state = ctx->args[3];
        if (start)
            __sync_fetch_and_add(&c->cpu_ns, now - start);
        if (!(prev_state & TASK_DEAD_STATE) && !tasks.lookup(&prev) &&
            !(acg_read_u32((void *)bpf_get_current_task(), ACG_OFF_TASK_FLAGS) & PF_EXITING))
            acg_track(prev, cg, 0);  /* moved in after it started: found here (not once exiting) */
        if ((ctx->args[0] & 0xff) || prev_state == TASK_RUNNING_STATE)
            acg_enqueued(prev, cg, now);  /* preempted: waits in the run queue again */
    }
    u32 next = acg_read_u32((void *)ctx->args[2], ACG_OFF_TASK_PID);
    struct acg_stamp *s = runq_since.lookup(&next);
    if (!s)
        return 0;
    u64 wait = now - s->ns;
    u64 ncg = s->cgroup_id;
    runq_since.delete(&next);
    struct acg_hist *h = runq_hist.lookup(&ncg);
    if (!h)
        return 0;
    u32 slot = acg_log2(wait);
    if (slot >= HIST_SLOTS)
        slot = HIST_SLOTS - 1;
    __sync_fetch_and_add(&h->slots[slot], 1);
    return 0;
}
