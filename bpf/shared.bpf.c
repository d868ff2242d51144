/* Maps every concern uses, and the helpers that filter on them. Always loaded first. */
#include "agentcg.h"

BPF_HASH(watched, u64, struct acg_watch, MAX_CGROUPS);
BPF_HASH(counters, u64, struct acg_counters, MAX_CGROUPS);
BPF_HASH(tasks, u32, struct acg_task, MAX_TASKS);
BPF_PERCPU_ARRAY(errors, u64, ERR_SLOTS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#ifdef ACG_CONCERN_MEMORY
/* tid -> cgroup: the task exec'd in a watched cgroup (process concern) and the memory
 * concern has not seen its new mm yet; that mm starts empty, so all of it counts. */
BPF_HASH(mm_fresh, u32, struct acg_stamp, MAX_TASKS);
#endif

static __always_inline void acg_error(int slot)
{
    u64 *n = errors.lookup(&slot);
    if (n)
        (*n)++;
}

/* The counters of the current task's cgroup, or NULL when it is not watched. */
static __always_inline struct acg_counters *acg_current(u64 *cgroup_id)
{
    u64 id = bpf_get_current_cgroup_id();
    *cgroup_id = id;
    if (!watched.lookup(&id))
        return NULL;
    return counters.lookup(&id);
}

static __always_inline struct acg_event *acg_reserve(u32 kind, u64 cgroup_id, u32 pid)
{
    struct acg_event *e = events.ringbuf_reserve(sizeof(struct acg_event));
    if (!e) {
        acg_error(ERR_RINGBUF_FULL);
        return NULL;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ktime_ns = bpf_ktime_get_ns();
    e->kind = kind;
    e->cgroup_id = cgroup_id;
    e->pid = pid;
    e->exit_code = -1;
    return e;
}

/* Remembers that `tid` belongs to `cgroup_id`, for tracepoints that fire outside its context. */
static __always_inline void acg_track_tgid(u32 tid, u32 tgid, u64 cgroup_id, u32 ppid)
{
    struct acg_task *t = tasks.lookup(&tid);
    if (t) {
        t->cgroup_id = cgroup_id;
        if (ppid)
            t->ppid = ppid;
        if (tgid)
            t->tgid = tgid;
        return;
    }
    struct acg_task fresh = {.cgroup_id = cgroup_id, .ppid = ppid, .tgid = tgid};
    if (tasks.update(&tid, &fresh))
        acg_error(ERR_TASKS_FULL);
}

/* As acg_track_tgid; the tgid is known only when `tid` is the current thread. */
static __always_inline void acg_track(u32 tid, u64 cgroup_id, u32 ppid)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    acg_track_tgid(tid, (u32)pid_tgid == tid ? pid_tgid >> 32 : 0, cgroup_id, ppid);
}

/* Entries of a removed cgroup are removed by user space when it reads this event. */
int acg_shared__cgroup__cgroup_rmdir(struct tracepoint__cgroup__cgroup_rmdir *args)
{
    u64 id = args->id;
    if (args->root != V2_HIERARCHY_ID || !watched.lookup(&id))
        return 0;
    watched.delete(&id);
    struct acg_event *e = acg_reserve(EV_CGROUP_REMOVED, id, 0);
    if (e)
        events.ringbuf_submit(e, 0);
    return 0;
}
