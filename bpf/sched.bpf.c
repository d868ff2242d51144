/* sched: CPU time and a run-queue latency histogram per cgroup, from sched_switch and
 * sched_wakeup (the woken task is not current there, so it is found in `tasks`). */
#include "agentcg.h"

/* sched_switch prev_state: TASK_REPORT bits; 0 (or only the preempt bit 0x100) = runnable */
#define TASK_REPORT_MASK 0xff
/* EXIT_DEAD | EXIT_ZOMBIE: the task's last switch, after sched_process_exit */
#define TASK_EXITED 0x30

BPF_PERCPU_ARRAY(oncpu_since, u64, 1);
BPF_HASH(runq_since, u32, struct acg_stamp, MAX_TASKS);
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

int acg_sched__sched__sched_wakeup(struct tracepoint__sched__sched_wakeup *args)
{
    u32 tid = args->pid;
    struct acg_task *t = tasks.lookup(&tid);
    if (t && watched.lookup(&t->cgroup_id))
        acg_enqueued(tid, t->cgroup_id, bpf_ktime_get_ns());
    return 0;
}

int acg_sched__sched__sched_wakeup_new(struct tracepoint__sched__sched_wakeup_new *args)
{
    u32 tid = args->pid;
    struct acg_task *t = tasks.lookup(&tid);
    if (t && watched.lookup(&t->cgroup_id))
        acg_enqueued(tid, t->cgroup_id, bpf_ktime_get_ns());
    return 0;
}

/* Runs in prev's context: prev's cgroup is the current one. */
int acg_sched__sched__sched_switch(struct tracepoint__sched__sched_switch *args)
{
    u64 now = bpf_ktime_get_ns();
    int zero = 0;
    u64 *since = oncpu_since.lookup(&zero);
    if (!since)
        return 0;
    u64 start = *since;
    *since = now;
    u64 cg = bpf_get_current_cgroup_id();
    struct acg_counters *c = watched.lookup(&cg) ? counters.lookup(&cg) : NULL;
    if (c) {
        u32 prev = args->prev_pid;
        if (start)
            __sync_fetch_and_add(&c->cpu_ns, now - start);
        if (!(args->prev_state & TASK_EXITED) && !tasks.lookup(&prev))
            acg_track(prev, cg, 0);  /* moved in after it started: found here */
        if ((args->prev_state & TASK_REPORT_MASK) == 0)
            acg_enqueued(prev, cg, now);  /* preempted: waits in the run queue again */
    }
    u32 next = args->next_pid;
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
